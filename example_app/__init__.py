"""A small Flask-SQLAlchemy app with flask-staleguard, built by an app factory.

``DATABASE_URL`` picks the database (SQLite by default, so it runs anywhere)::

    DATABASE_URL=mysql+pymysql://root@127.0.0.1:3306/test flask --app example_app run
"""

from __future__ import annotations

import os
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from flask_staleguard import StaleGuard

db = SQLAlchemy()
guard = StaleGuard()


class Visit(db.Model):  # type: ignore[name-defined,misc]
    """One page view."""

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(sa.String(200))


def create_app(
    config: t.Mapping[str, t.Any] | None = None, *, guarded: bool = True
) -> Flask:
    """Build the app; ``guarded=False`` leaves flask-staleguard out, for the demo."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get(
        "DATABASE_URL", "sqlite:///example.sqlite"
    )
    app.config.from_prefixed_env("EXAMPLE")
    app.config.update(config or {})
    if guarded:
        guard.init_app(app)  # before db.init_app: it derives the engine options
    db.init_app(app)
    with app.app_context():
        db.create_all()

    @app.route("/")
    def index() -> dict[str, t.Any]:
        db.session.add(Visit(path="/"))
        db.session.commit()
        return {"visits": db.session.scalar(sa.select(sa.func.count(Visit.id)))}

    @app.route("/health")
    def health() -> dict[str, t.Any]:
        db.session.execute(sa.text("SELECT 1"))
        return {"ok": True, "staleguard": guard.stats() if guarded else None}

    return app
