"""Where a connection was checked out: the app's frames, not the library's."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

#: How many of the app's own frames to remember.
DEPTH = 3
#: Packages whose frames are plumbing between the app and the pool. Found
#: without importing them: the core imports no web framework.
_PLUMBING = ("flask_staleguard", "sqlalchemy", "flask_sqlalchemy", "flask", "werkzeug")


def _folder(package: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # not installed, or half imported
        return None
    if spec is None or not spec.origin:
        return None
    return os.path.dirname(spec.origin) + os.sep


_INTERNAL = tuple(f for f in map(_folder, _PLUMBING) if f) + (
    "<frozen ",
    contextlib.__file__,
)
# Keyed by file name: str caches its hash, a code object does not.
_internal_file: dict[str, bool] = {}

Site = tuple[tuple[str, int, str], ...]


def checkout_site() -> Site:
    """The innermost app frames calling into the pool, as (file, line, function).

    Runs on every checkout, so it only walks frames and reads line numbers; a
    per-file cache keeps the prefix tests off the hot path.
    """
    frame: types.FrameType | None = sys._getframe(1)
    site: list[tuple[str, int, str]] = []
    while frame is not None and len(site) < DEPTH:
        code = frame.f_code
        filename = code.co_filename
        internal = _internal_file.get(filename)
        if internal is None:
            internal = _internal_file[filename] = filename.startswith(_INTERNAL)
        if not internal:
            site.append((filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return tuple(site)


def format_site(site: Site) -> str:
    """``file:line in function`` for each frame, innermost first."""
    if not site:
        return "an unknown place"
    return " <- ".join(f"{f}:{line} in {name}" for f, line, name in site)
