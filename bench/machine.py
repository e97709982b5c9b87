"""Facts about the machine and software a benchmark ran on, for the results file."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import typing as t
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_digest() -> str:
    """A short hash of ``flask_staleguard/*.py`` as measured (the tree may be dirty)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "flask_staleguard").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other users of the machine show here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts(server_version: str | None = None) -> dict[str, t.Any]:
    """What the results depend on: CPU, versions, and the code's exact state."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in (
                "flask",
                "flask-sqlalchemy",
                "sqlalchemy",
                "pymysql",
                "gunicorn",
                "werkzeug",
            )
        },
        "mariadb": server_version,
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "flask_staleguard_dirty": bool(
            _git("status", "--porcelain", "--", "flask_staleguard")
        ),
        "flask_staleguard_digest": source_digest(),
        "load_average_at_start": load_average(),
    }
