"""Flask-SQLAlchemy-Lite (Flask 3) with flask-staleguard, in an app factory.

    DATABASE_URL=mysql+pymysql://app:secret@db/app \
        flask --app example_app.integrations.flask_sqlalchemy_lite_app run

``STALEGUARD_STRATEGY=off`` turns the checks off, to see the failure they prevent.
"""

from __future__ import annotations

import os
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy_lite import SQLAlchemy

from flask_staleguard import StaleGuard

DATABASE_URL = os.environ.get("DATABASE_URL", "mysql+pymysql://root@127.0.0.1/test")

db = SQLAlchemy()
guard = StaleGuard()


def create_app() -> Flask:
    app = Flask(__name__)
    # Each engine is a bind of the guard, by its name here.
    app.config["SQLALCHEMY_ENGINES"] = {"default": DATABASE_URL}
    app.config["STALEGUARD_STRATEGY"] = os.environ.get("STALEGUARD_STRATEGY", "guard")
    guard.init_app(app)  # before or after db.init_app: either order works
    db.init_app(app)

    @app.get("/")
    def index() -> dict[str, str]:
        now = db.session.execute(sa.text("SELECT CURRENT_TIMESTAMP")).scalar_one()
        return {"server_time": str(now)}

    @app.get("/stats")
    def stats() -> dict[str, t.Any]:
        # Per engine: checkouts, connections replaced by reason, disconnects, leaks.
        return guard.stats()

    return app
