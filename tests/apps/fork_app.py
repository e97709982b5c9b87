"""A gunicorn ``--preload`` app that queries the database in the master.

``DATABASE_URL`` picks the database; ``STALEGUARD_TEST_GUARD=0`` leaves the guard
out (the control case). The master's connection goes back to the pool
before the fork, so every worker inherits it: the guard must never hand it out.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import StaleGuard

db = SQLAlchemy()
app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 4, "max_overflow": 4}
guarded = os.environ.get("STALEGUARD_TEST_GUARD", "1") == "1"
if guarded:
    StaleGuard(app)
db.init_app(app)

with app.app_context():
    #: The server id of the connection the master opened and pooled before forking.
    MASTER_CONNECTION_ID = int(
        db.session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
    )
    db.session.remove()
MASTER_PID = os.getpid()


@app.route("/q")
def query() -> dict[str, int]:
    row = db.session.execute(
        sa.text(
            "SELECT CONNECTION_ID(), :pid, COUNT(*) FROM information_schema.TABLES"
        ),
        {"pid": os.getpid()},
    ).one()
    assert int(row[1]) == os.getpid()  # the reply belongs to this very query
    return {"connection": int(row[0]), "pid": os.getpid(), "fork": fork_replacements()}


@app.route("/master")
def master() -> dict[str, int]:
    return {"connection": MASTER_CONNECTION_ID, "pid": MASTER_PID}


def fork_replacements() -> int:
    """How many inherited connections this worker's guard replaced (-1: no guard)."""
    if not guarded:
        return -1
    replaced = app.extensions["staleguard"].binds[None].stats.replaced
    return int(replaced.get("fork", 0))
