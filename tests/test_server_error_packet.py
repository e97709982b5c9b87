"""MySQL 8 writes an error packet (4031) to an idle connection before closing it.

MariaDB never does, so a proxy plays the server's part: it sends the packet, then
closes the connection.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from tests.helpers import AppFactory
from tests.helpers import connection_id
from tests.helpers import replaced
from tests.proxies import TcpProxy
from tests.servers import MariaDBServer

MESSAGE = (
    b"#HY000The client was disconnected by the server because of inactivity."
    b" See wait_timeout and interactive_timeout for configuring this behavior."
)
ERR_4031 = (
    (len(MESSAGE) + 3).to_bytes(3, "little")
    + b"\x00\xff"
    + (4031).to_bytes(2, "little")
    + MESSAGE
)


@pytest.mark.parametrize("guarded", [True, False])
def test_error_packet_then_close(
    make_app: AppFactory, mariadb: MariaDBServer, guarded: bool, guard_log: object
) -> None:
    with TcpProxy(mariadb.host, mariadb.port) as proxy:
        app, db = make_app(
            proxy.url_for(mariadb.url),
            guard=guarded,
            SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
        )
        with app.app_context():
            first = connection_id(db)
            # The guard's discovery connection went through the proxy too; wait
            # until the proxy has seen it close, so only the pooled one is left.
            deadline = time.monotonic() + 5
            while proxy.active_connections != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proxy.say_and_close(ERR_4031) == 1
            time.sleep(0.2)
            if not guarded:
                with pytest.raises(sa.exc.OperationalError):
                    connection_id(db)
                return
            assert connection_id(db) != first
        seen = replaced(app)
        assert seen == {"probe_server_error": 1}
