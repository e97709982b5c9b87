"""The problem and the fix, side by side, against a real MariaDB.

Each app's connections get a 2-second ``wait_timeout`` (``SET SESSION`` at
connect, so the server's global settings are left alone). The script warms a pool,
stays idle for 3 seconds, then sends requests: without flask-staleguard the first
one fails with "MySQL server has gone away"; with it, every one succeeds.

    python -m example_app.demo [DATABASE_URL]
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import typing as t

import sqlalchemy as sa
from flask import Flask

from example_app import create_app

# The server's timer starts at each connect: 4 s leaves room for a loaded machine
# to open the other pooled connections before the first one's timer runs out.
IDLE = 5.0
SESSION_TIMEOUT = 4


def run(make_app: t.Callable[[], Flask], label: str) -> int:
    """Make the app, warm its pool, idle past the timeout, send five requests;
    count the failures.
    """
    print(f"\n== {label}")
    app = make_app()  # after the heading: the guard logs its start-up line
    with app.app_context(), contextlib.ExitStack() as stack:
        from example_app import db

        for _ in range(3):
            stack.enter_context(db.engine.connect()).execute(sa.text("SELECT 1"))
    print(
        f"   3 pooled connections, now idle for {IDLE:g} s "
        f"(the server closes them after {SESSION_TIMEOUT} s)..."
    )
    time.sleep(IDLE)
    client = app.test_client()
    failures = 0
    for n in range(1, 6):
        try:
            response = client.get("/")
            print(f"   request {n}: {response.status_code} {response.get_json()}")
        except sa.exc.OperationalError as e:
            failures += 1
            print(f"   request {n}: FAILED {e.orig!r}")
    return failures


def main() -> int:
    """Run the demo on ``argv[1]``, ``DATABASE_URL`` or the local MariaDB."""
    default = "mysql+pymysql://root@127.0.0.1:3306/test"
    return main_for(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DATABASE_URL", default)
    )


def main_for(url: str) -> int:
    """Run the demo against ``url``; 0 when it showed the failure and the fix."""
    # The log goes where the prints go, so piped output stays in order.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter("   log: %(name)s %(levelname)s %(message)s")
    )
    logger = logging.getLogger("flask_staleguard")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return _compare(url)
    finally:
        logger.removeHandler(handler)


def _compare(url: str) -> int:
    """The same app without and with the guard; 0 when only the first failed."""
    config = {
        "SQLALCHEMY_DATABASE_URI": url,
        "SQLALCHEMY_ENGINE_OPTIONS": {
            "pool_size": 3,
            "connect_args": {
                "init_command": f"SET SESSION wait_timeout={SESSION_TIMEOUT}"
            },
        },
        "TESTING": True,
        "PROPAGATE_EXCEPTIONS": True,
    }
    bare = run(lambda: create_app(config, guarded=False), "Flask-SQLAlchemy alone")
    guarded = run(lambda: create_app(config), "with flask-staleguard")
    print(f"\nfailed requests: {bare} without the guard, {guarded} with it")
    return 0 if bare > 0 and guarded == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
