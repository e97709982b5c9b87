"""Real WSGI servers for tests: Werkzeug's in this process, gunicorn in its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import typing as t
import urllib.request
from pathlib import Path
from types import TracebackType

from werkzeug.serving import make_server

from tests.servers import free_port
from tests.servers import wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def get_json(url: str, timeout: float = 10) -> t.Any:
    """The JSON body of ``GET url``."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Werkzeug:
    """Werkzeug's threaded server for ``app`` on a free port, in a thread.

    Unlike the test client, it closes each response when the client has read it,
    as production servers do.
    """

    def __init__(self, app: t.Any) -> None:
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="werkzeug", daemon=True
        )
        #: The server's base URL, ``http://127.0.0.1:<port>``.
        self.url = f"http://127.0.0.1:{self._server.port}"

    def __enter__(self) -> Werkzeug:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class Gunicorn:
    """gunicorn serving ``app`` (``module:attribute``) on a free port, stopped
    (TERM, then KILL) when the block ends; its output goes to ``log``.
    """

    def __init__(
        self, app: str, log: Path, *options: str, url: str = "", **env: str
    ) -> None:
        self.port = free_port()
        self.log = log
        self.app = app
        self.options = options
        self.env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gunicorn:
        args = [
            sys.executable, "-m", "gunicorn", *self.options,
            "--bind", f"127.0.0.1:{self.port}", "--timeout", "30", self.app,
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        proc = self.proc
        try:
            if not wait_for_port(
                "127.0.0.1", self.port, 30, lambda: proc.poll() is None
            ):
                raise RuntimeError(
                    f"gunicorn did not start:\n{self.log.read_text(errors='replace')}"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def get(self, path: str) -> t.Any:
        return get_json(f"{self.url}{path}")
