"""Celery with ``flask_staleguard.protect()``: a worker whose tasks use a guarded
engine, however long they idled between tasks.

    DATABASE_URL=mysql+pymysql://app:secret@db/app \
        celery --app example_app.integrations.celery_app worker

``STALEGUARD_STRATEGY=off`` turns the checks off, to see the failure they prevent.
"""

from __future__ import annotations

import os
import typing as t

import sqlalchemy as sa
from celery import Celery

from flask_staleguard import protect

DATABASE_URL = os.environ.get("DATABASE_URL", "mysql+pymysql://root@127.0.0.1/test")
# Celery's own first steps: RabbitMQ on localhost, results over it.
BROKER_URL = os.environ.get("CELERY_BROKER_URL", "pyamqp://guest@127.0.0.1//")
RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "rpc://")

app = Celery(__name__, broker=BROKER_URL, backend=RESULT_BACKEND)
app.conf.broker_connection_retry_on_startup = True

# Made and protected at import, in the worker's main process, before the prefork
# pool forks its children: each child has its own copy of the pool, and the
# guard drops a connection a child inherited at its first checkout (reason
# "fork") instead of sharing the parent's socket.
engine = sa.create_engine(DATABASE_URL)
protection = protect(engine, strategy=os.environ.get("STALEGUARD_STRATEGY", "guard"))


@app.task
def server_time() -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT CURRENT_TIMESTAMP")).scalar_one())


@app.task
def pool_stats() -> dict[str, t.Any]:
    """This worker process's counters: checkouts, connections replaced by reason."""
    return protection.stats()
