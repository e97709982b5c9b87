"""The app gunicorn serves in the throughput scenario: one read endpoint.

``BENCH_VARIANT`` picks the variant (see :mod:`bench.variants`) and
``BENCH_DATABASE_URL`` the database; gunicorn loads ``bench.wsgi:app``.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from flask import Flask

from .variants import build

_bench_app = build(os.environ["BENCH_VARIANT"], os.environ["BENCH_DATABASE_URL"])
_db = _bench_app.db
app: Flask = _bench_app.app
_SELECT_1 = sa.text("SELECT 1")


@app.get("/")
def read() -> str:
    """A simple read: one pooled connection, ``SELECT 1``, returned at teardown."""
    return str(_db.session.execute(_SELECT_1).scalar())


@app.get("/_bench/stats")
def bench_stats() -> dict[str, object]:
    """This worker's connect count and guard counters (for the raw output)."""
    return {
        "pid": os.getpid(),
        "connects": _bench_app.connects,
        "guard": _bench_app.guard_stats(),
    }
