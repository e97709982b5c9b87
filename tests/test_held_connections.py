"""A connection its holder still uses is never handed to anyone else.

Streamed responses keep the connections taken in their view until the server
closes them; a connection kept past its app context is taken back by closing
it, so its holder fails with a clear error instead of reading another request's
data. Real servers: Werkzeug's, which closes responses as production servers do.
"""

from __future__ import annotations

import threading
import typing as t
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pymysql
import pymysql.cursors
import pytest
import sqlalchemy as sa
from flask import Flask
from flask import Response
from flask import stream_with_context
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import ConnectionReclaimed
from flask_staleguard.core.holders import held_by
from tests.helpers import AppFactory
from tests.helpers import stats
from tests.servers import MariaDBServer
from tests.webservers import Werkzeug

ROWS = 3000
POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 10}


def leak_warnings(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if "was not returned" in r.message]


def stream_app(
    make_app: AppFactory,
    url: str,
    *,
    with_context: bool,
    guard: bool = True,
    keep: list[sa.Connection] | None = None,
) -> tuple[Flask, SQLAlchemy]:
    """``/stream`` streams ROWS rows from a connection taken in the view; with
    ``keep``, the stream forgets to close it (and ``keep`` holds it, as a leak
    in a cache would).
    """
    app, db = make_app(url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=POOL)

    @app.route("/stream")
    def stream() -> Response:
        conn = db.engine.connect()
        if keep is not None:
            keep.append(conn)

        def rows() -> t.Iterator[str]:
            try:
                n = 0
                for (seq,) in conn.execute(sa.text(f"SELECT seq FROM seq_1_to_{ROWS}")):
                    n += 1
                    yield f"{seq}\n"
                yield f"rows={n}\n"
            finally:
                if keep is None:
                    conn.close()

        body = rows()
        return Response(stream_with_context(body) if with_context else body)

    return app, db


@pytest.mark.parametrize("with_context", [False, True], ids=["plain", "with_context"])
@pytest.mark.parametrize("guard", [False, True], ids=["bare", "guarded"])
def test_a_stream_keeps_the_connection_its_view_took(
    make_app: AppFactory,
    mariadb: MariaDBServer,
    guard_log: pytest.LogCaptureFixture,
    with_context: bool,
    guard: bool,
) -> None:
    app, _ = stream_app(make_app, mariadb.url, with_context=with_context, guard=guard)
    with Werkzeug(app) as server:
        body = urllib.request.urlopen(f"{server.url}/stream", timeout=30).read()
    lines = body.decode().splitlines()
    assert lines[-1] == f"rows={ROWS}"
    assert lines[:-1] == [str(n) for n in range(1, ROWS + 1)]
    if guard:
        assert leak_warnings(guard_log) == []
        assert stats(app)["leaks_detected"] == 0


@pytest.mark.parametrize("with_context", [False, True], ids=["plain", "with_context"])
def test_a_stream_that_forgets_its_connection_is_reported_once_closed(
    make_app: AppFactory,
    mariadb: MariaDBServer,
    guard_log: pytest.LogCaptureFixture,
    with_context: bool,
) -> None:
    kept: list[sa.Connection] = []
    app, db = stream_app(make_app, mariadb.url, with_context=with_context, keep=kept)
    with Werkzeug(app) as server:
        with urllib.request.urlopen(f"{server.url}/stream", timeout=30) as response:
            first = response.readline()
            # Streaming: the teardown has run, the response is still open.
            assert leak_warnings(guard_log) == []
            rest = response.read()
        assert first == b"1\n"
        assert rest.endswith(f"rows={ROWS}\n".encode())
        # The server closes the response right after sending its last byte.
        for _ in range(100):
            if leak_warnings(guard_log):
                break
            threading.Event().wait(0.05)
    (warning,) = leak_warnings(guard_log)
    assert "checked out during GET /stream (endpoint 'stream')" in warning
    assert stats(app)["leaks_reclaimed"] == 1
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_an_unbuffered_export_reads_only_its_own_rows(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)

    @app.route("/export")
    def export() -> Response:
        raw = db.engine.raw_connection()
        cursor = raw.cursor(pymysql.cursors.SSCursor)
        cursor.execute("SET @owner = 'export'")
        # Unbuffered: the rows are read from the socket as the body is sent.
        cursor.execute(f"SELECT seq, @owner FROM seq_1_to_{ROWS}")

        def rows() -> t.Iterator[str]:
            try:
                for seq, owner in t.cast(t.Iterable[tuple[int, str]], cursor):
                    yield f"{seq} {owner}\n"
            finally:
                cursor.close()
                raw.close()

        return Response(rows())

    @app.route("/other/<int:n>")
    def other(n: int) -> str:
        db.session.execute(sa.text("SET @owner = :owner"), {"owner": f"other{n}"})
        return str(db.session.execute(sa.text("SELECT @owner")).scalar_one())

    with Werkzeug(app) as server:
        with urllib.request.urlopen(f"{server.url}/export", timeout=30) as response:
            first = response.readline()
            # Other requests run while the export is half read.
            with ThreadPoolExecutor(4) as pool:
                others = list(
                    pool.map(
                        lambda n: (
                            urllib.request.urlopen(
                                f"{server.url}/other/{n}", timeout=30
                            )
                            .read()
                            .decode()
                        ),
                        range(8),
                    )
                )
            rest = response.read()
    lines = (first + rest).decode().splitlines()
    assert lines == [f"{n} export" for n in range(1, ROWS + 1)]
    assert others == [f"other{n}" for n in range(8)]
    assert leak_warnings(guard_log) == []


@pytest.fixture()
def pool_of_one(
    make_app: AppFactory, mariadb: MariaDBServer
) -> tuple[Flask, SQLAlchemy]:
    app, db = make_app(
        mariadb.url,
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": 1,
            "max_overflow": 0,
            "pool_timeout": 2,
        },
    )

    @app.route("/second")
    def second() -> str:
        db.session.execute(sa.text("SET @owner = 'second'"))
        return str(db.session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())

    return app, db


def test_a_raw_connection_kept_past_its_context_is_never_shared(
    pool_of_one: tuple[Flask, SQLAlchemy], guard_log: pytest.LogCaptureFixture
) -> None:
    app, db = pool_of_one
    kept: dict[str, t.Any] = {}

    @app.route("/keep")
    def keep() -> str:
        raw = db.engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("SET @owner = 'holder'")
        cursor.execute("SELECT CONNECTION_ID()")
        (connection_id,) = t.cast(tuple[int], cursor.fetchone())
        kept.update(raw=raw, cursor=cursor, id=connection_id)
        return "kept"

    client = app.test_client()
    assert client.get("/keep").text == "kept"
    second = int(client.get("/second").text)
    assert second != kept["id"]  # a new connection, not the holder's
    # The holder's next use fails, and says why; it never sees 'second'.
    with pytest.raises(ConnectionReclaimed, match="closed this connection"):
        kept["raw"].cursor()
    with pytest.raises(pymysql.err.InterfaceError):  # the driver's own: closed
        kept["cursor"].execute("SELECT @owner")
    (warning,) = leak_warnings(guard_log)
    assert "its holder's next use raises ConnectionReclaimed" in warning
    kept["raw"].close()  # and closing it afterwards is harmless
    assert stats(app)["leaks_reclaimed"] == 1


def test_a_sqlalchemy_connection_kept_past_its_context_fails_clearly(
    pool_of_one: tuple[Flask, SQLAlchemy],
) -> None:
    app, db = pool_of_one
    kept: list[sa.Connection] = []

    @app.route("/keep")
    def keep() -> str:
        conn = db.engine.connect()
        conn.execute(sa.text("SET @owner = 'holder'"))
        kept.append(conn)
        return "kept"

    client = app.test_client()
    client.get("/keep")
    client.get("/second")
    (conn,) = kept
    with pytest.raises(sa.exc.StatementError) as info:
        conn.execute(sa.text("SELECT @owner"))
    assert isinstance(info.value.orig, ConnectionReclaimed)
    with pytest.raises(ConnectionReclaimed):
        conn.commit()  # nothing the holder wrote can be committed
    conn.rollback()
    conn.close()
    # The pool is whole: the next request works.
    assert client.get("/second").status_code == 200


def test_warn_policy_leaves_the_connection_with_its_holder(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(
        mariadb.url,
        STALEGUARD_LEAKS="warn",
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": 1,
            "max_overflow": 0,
            "pool_timeout": 1,
        },
    )
    kept: list[sa.Connection] = []

    @app.route("/keep")
    def keep() -> str:
        conn = db.engine.connect()
        kept.append(conn)
        return str(conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())

    held = int(app.test_client().get("/keep").text)
    assert len(leak_warnings(guard_log)) == 1
    (conn,) = kept
    # Still the holder's, and still working.
    assert conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one() == held
    conn.close()
    assert stats(app)["leaks_reclaimed"] == 0


def test_a_context_holds_what_it_checked_out_itself() -> None:
    """The teardown's test compares owners by identity: another context equal to
    the ending one (a subclass's ``__eq__``) does not make its clean-up run.
    """

    class Context:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    ending = Context()
    checked_out = {"a": (None, (), 0.0, None), "b": (Context(), (), 0.0, None)}
    assert not held_by(checked_out, ending)
    checked_out["c"] = (ending, (), 1.0, None)
    assert held_by(checked_out, ending)
    assert not held_by({}, ending)
