"""A statement interrupted after it was sent leaves its reply unread.

A ``BaseException`` (gevent's ``Timeout``, a worker timeout, a signal) that lands
between the driver's write and its read leaves the server's reply on the socket.
A ping at the next checkout would take that reply for its own and leave its own
answer for the next statement, which then reads the wrong result: on a plain-TCP
MySQL connection the guard replaces such a connection instead.
"""

from __future__ import annotations

import sys
import time
import types
import typing as t

import pymysql.connections
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from tests.helpers import AppFactory
from tests.helpers import raises
from tests.helpers import stats
from tests.servers import MariaDBServer


class Interrupt(BaseException):
    """What gevent's Timeout or a worker's alarm raises: not an Exception."""


def interrupt_after_send() -> None:
    """Raise :class:`Interrupt` as the driver starts reading the reply to the
    statement it just sent: deterministically, where a timer would by chance.
    """
    read = pymysql.connections.Connection._read_packet.__code__

    def trace(frame: types.FrameType, event: str, arg: t.Any) -> None:
        if event == "call" and frame.f_code is read:
            sys.settrace(None)
            raise Interrupt("after the statement was sent")

    sys.settrace(trace)


def interrupted_app(
    make_app: AppFactory, url: str, *, guard: bool
) -> tuple[Flask, SQLAlchemy]:
    # No reset on return (common with autocommit): nothing reads the reply
    # before the next checkout.
    app, db = make_app(
        url,
        guard=guard,
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": 1,
            "max_overflow": 0,
            "pool_reset_on_return": None,
        },
    )

    @app.route("/interrupted")
    def interrupted() -> str:
        raw = db.engine.raw_connection()
        try:
            cursor = raw.cursor()
            interrupt_after_send()
            try:
                cursor.execute("SET @x = SLEEP(0.2)")
            except Interrupt:
                return "interrupted"
            finally:
                sys.settrace(None)
        finally:
            raw.close()
        return "not interrupted"

    @app.route("/q/<int:n>")
    def query(n: int) -> str:
        return str(db.session.execute(sa.text("SELECT :n"), {"n": n}).scalar())

    return app, db


def test_the_next_request_gets_its_own_result(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, _ = interrupted_app(make_app, mariadb.url, guard=True)
    client = app.test_client()
    assert client.get("/interrupted").text == "interrupted"
    time.sleep(0.4)  # the reply has arrived, unread
    assert [client.get(f"/q/{n}").text for n in (41, 42, 43)] == ["41", "42", "43"]
    counters = stats(app)
    assert counters["replaced"] == {"probe_unread": 1}


def test_without_the_guard_the_next_request_reads_the_wrong_reply(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, _ = interrupted_app(make_app, mariadb.url, guard=False)
    client = app.test_client()
    assert client.get("/interrupted").text == "interrupted"
    time.sleep(0.4)
    with raises(sa.exc.SQLAlchemyError):  # the scenario is real
        client.get("/q/41")
