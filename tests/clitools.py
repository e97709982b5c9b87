"""Run ``flask staleguard`` commands: in this process, or as a real ``flask --app``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as t
from pathlib import Path

from flask import Flask

import flask_staleguard

# The app a real `flask --app` subprocess loads: its config comes from the test,
# and the guard's log goes to stderr, where the tests look for secrets.
APP_MODULE = """\
import json
import logging
import os

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import StaleGuard

handler = logging.StreamHandler()
logging.getLogger("flask_staleguard").addHandler(handler)
logging.getLogger("flask_staleguard").setLevel(logging.DEBUG)

app = Flask(__name__)
app.config.update(json.loads(os.environ["SG_TEST_CONFIG"]))
StaleGuard(app)
db = SQLAlchemy(app)
"""


def run_flask(
    tmp_path: Path, config: dict[str, t.Any], *args: str
) -> subprocess.CompletedProcess[str]:
    """``flask --app <test app> staleguard ARGS`` in a process of its own."""
    module = tmp_path / "sg_cli_app.py"
    module.write_text(APP_MODULE)
    package_root = Path(flask_staleguard.__file__).parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(package_root), str(tmp_path)]),
        "SG_TEST_CONFIG": json.dumps(config),
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "sg_cli_app", "staleguard", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def invoke(app: Flask, *args: str) -> t.Any:
    """``flask staleguard ARGS`` in this process, with stdout and stderr apart."""
    try:
        runner = app.test_cli_runner(mix_stderr=False)  # click < 8.2 mixes them
    except TypeError:  # click 8.2+ always keeps them apart, and has no such option
        runner = app.test_cli_runner()
    return runner.invoke(args=["staleguard", *args])
