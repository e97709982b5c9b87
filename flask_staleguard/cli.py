"""The ``flask staleguard`` command group: thin click wrappers over plain functions."""

from __future__ import annotations

from flask.cli import AppGroup

cli = AppGroup(
    "staleguard", help="Inspect the connection pools and check their settings."
)
