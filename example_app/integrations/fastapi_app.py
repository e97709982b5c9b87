"""FastAPI with ``flask_staleguard.protect()``: no Flask involved.

    DATABASE_URL=mysql+pymysql://app:secret@db/app \
        uvicorn example_app.integrations.fastapi_app:app

``STALEGUARD_STRATEGY=off`` turns the checks off, to see the failure they prevent.
"""

from __future__ import annotations

import contextlib
import os
import typing as t
from collections.abc import AsyncIterator
from collections.abc import Iterator

import sqlalchemy as sa
from fastapi import Depends
from fastapi import FastAPI
from fastapi import Request

from flask_staleguard import protect

DATABASE_URL = os.environ.get("DATABASE_URL", "mysql+pymysql://root@127.0.0.1/test")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = sa.create_engine(DATABASE_URL)
    app.state.engine = engine
    # Never blocks: the first connection tells the server's idle timeout.
    app.state.protection = protect(
        engine, strategy=os.environ.get("STALEGUARD_STRATEGY", "guard")
    )
    yield
    engine.dispose()


app = FastAPI(lifespan=lifespan)


def connection(request: Request) -> Iterator[sa.Connection]:
    """A pooled connection for one request, back in the pool after it."""
    with request.app.state.engine.connect() as conn:
        yield conn


@app.get("/")
def index(conn: t.Annotated[sa.Connection, Depends(connection)]) -> dict[str, str]:
    now = conn.execute(sa.text("SELECT CURRENT_TIMESTAMP")).scalar_one()
    return {"server_time": str(now)}


@app.get("/stats")
def stats(request: Request) -> dict[str, t.Any]:
    # Checkouts, connections replaced by reason, disconnects seen.
    return t.cast(dict[str, t.Any], request.app.state.protection.stats())
