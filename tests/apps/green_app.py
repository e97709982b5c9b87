"""An app under gevent or eventlet, monkey-patched before or after
``flask_staleguard`` is imported: what an app module under ``gunicorn -k gevent``
(or ``--preload``, or eventlet's server) does.

Environment: ``STALEGUARD_TEST_GREEN`` (``gevent`` or ``eventlet``),
``STALEGUARD_TEST_PATCH`` (``before`` or ``after``), ``DATABASE_URL``;
``STALEGUARD_TEST_GUARD=0`` leaves the guard out.
"""

from __future__ import annotations

import os
import typing as t

GREEN = os.environ.get("STALEGUARD_TEST_GREEN", "gevent")
PATCH = os.environ.get("STALEGUARD_TEST_PATCH", "before")


def patch() -> None:
    if GREEN == "eventlet":
        import eventlet

        eventlet.monkey_patch()
    else:
        from gevent import monkey

        monkey.patch_all()


if PATCH == "before":
    patch()

import flask_staleguard  # noqa: E402

if PATCH == "after":
    patch()

import sqlalchemy as sa  # noqa: E402
from flask import Flask  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402

guarded = os.environ.get("STALEGUARD_TEST_GUARD", "1") == "1"
app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
    "pool_size": 4,
    "max_overflow": 0,
    "pool_timeout": 20,
}
guard = flask_staleguard.StaleGuard(app) if guarded else None
db = SQLAlchemy(app)


@app.route("/q")
def query() -> dict[str, t.Any]:
    # SLEEP holds the connection, so concurrent green requests need all four.
    row = db.session.execute(sa.text("SELECT CONNECTION_ID(), SLEEP(0.2)")).one()
    return {"connection": int(row[0])}


@app.route("/stats")
def stats() -> dict[str, t.Any]:
    return guard.stats(app)["default"] if guard is not None else {}


def main() -> None:
    """Serve on ``argv[1]`` with the green library's own WSGI server."""
    import sys

    port = int(sys.argv[1])
    if GREEN == "eventlet":
        import eventlet
        import eventlet.wsgi

        eventlet.wsgi.server(
            eventlet.listen(("127.0.0.1", port)), app, log_output=False
        )
    else:
        from gevent.pywsgi import WSGIServer

        WSGIServer(("127.0.0.1", port), app, log=None).serve_forever()


if __name__ == "__main__":
    main()
