"""An engine and a scoped session a Flask app makes itself, as in Flask's
"SQLAlchemy in Flask" pattern, guarded with ``guard.add_engine()``.

    DATABASE_URL=mysql+pymysql://app:secret@db/app \
        flask --app example_app.integrations.hand_made_app run

``STALEGUARD_STRATEGY=off`` turns the checks off, to see the failure they prevent.
"""

from __future__ import annotations

import os
import typing as t

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from flask_staleguard import StaleGuard

DATABASE_URL = os.environ.get("DATABASE_URL", "mysql+pymysql://root@127.0.0.1/test")

engine = sa.create_engine(DATABASE_URL)
db_session = scoped_session(sessionmaker(bind=engine))
guard = StaleGuard()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["STALEGUARD_STRATEGY"] = os.environ.get("STALEGUARD_STRATEGY", "guard")
    guard.init_app(app)
    guard.add_engine(app, engine, "main")  # a bind called "main"
    # Removed at the end of every app context, as the pattern's own
    # teardown_appcontext function would, and even when another teardown raises.
    guard.register_session(db_session)

    @app.get("/")
    def index() -> dict[str, str]:
        now = db_session.execute(sa.text("SELECT CURRENT_TIMESTAMP")).scalar_one()
        return {"server_time": str(now)}

    @app.get("/stats")
    def stats() -> dict[str, t.Any]:
        # {"main": {checkouts, connections replaced by reason, disconnects, leaks}}
        return guard.stats()

    return app
