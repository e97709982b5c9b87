"""Read and write Flask-SQLAlchemy's per-bind engine options in ``app.config``.

Flask-SQLAlchemy applies ``SQLALCHEMY_ENGINE_OPTIONS`` to the default bind only,
and only when ``SQLALCHEMY_DATABASE_URI`` is set; every other bind takes its
options from its ``SQLALCHEMY_BINDS`` entry. These functions follow the same rules.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from .config import BindKey

URI = "SQLALCHEMY_DATABASE_URI"
ENGINE_OPTIONS = "SQLALCHEMY_ENGINE_OPTIONS"
BINDS = "SQLALCHEMY_BINDS"


def flask_sqlalchemy(app: Flask) -> t.Any:
    """The app's Flask-SQLAlchemy extension; ``None`` if the app has none, or
    another extension (Flask-SQLAlchemy-Lite) under its key.
    """
    db = app.extensions.get("sqlalchemy")
    return db if isinstance(db, SQLAlchemy) else None


def engine_configs(config: t.Mapping[str, t.Any]) -> dict[BindKey, dict[str, t.Any]]:
    """Per bind key, the options (with ``url``) Flask-SQLAlchemy will use."""
    configs: dict[BindKey, dict[str, t.Any]] = {}
    for key, value in (config.get(BINDS) or {}).items():
        if isinstance(value, (str, sa.engine.URL)):
            configs[key] = {"url": value}
        else:
            configs[key] = dict(value)
    basic = dict(config.get(ENGINE_OPTIONS) or {})
    if config.get(URI) is not None:
        basic["url"] = config[URI]
    if "url" in basic:
        configs.setdefault(None, {}).update(basic)
    return configs


def add_engine_options(
    config: t.MutableMapping[str, t.Any], key: BindKey, options: t.Mapping[str, t.Any]
) -> None:
    """Add ``options`` to the config entry Flask-SQLAlchemy reads for ``key``.

    The dicts are copied before writing: config classes often share one dict
    between apps, and one app's guard must not reach another's engines.
    """
    if key is None and config.get(URI) is not None:
        config[ENGINE_OPTIONS] = {**(config.get(ENGINE_OPTIONS) or {}), **options}
        return
    binds = dict(config.get(BINDS) or {})
    entry = binds[key]
    if isinstance(entry, (str, sa.engine.URL)):
        entry = {"url": entry}
    binds[key] = {**entry, **options}
    config[BINDS] = binds


#: Flask-SQLAlchemy-Lite's config keys: engine name to URL or options.
LITE_ENGINES = "SQLALCHEMY_ENGINES"
LITE_ASYNC_ENGINES = "SQLALCHEMY_ASYNC_ENGINES"
#: How an async engine of Flask-SQLAlchemy-Lite is named among the binds: its
#: sync engines may have the same names.
ASYNC_PREFIX = "async/"


def is_lite(extension: object) -> bool:
    """Whether ``extension`` is Flask-SQLAlchemy-Lite's (without importing it)."""
    return type(extension).__module__.startswith("flask_sqlalchemy_lite")


def lite_names(config: t.Mapping[str, t.Any]) -> list[str]:
    """The bind names of the engines Flask-SQLAlchemy-Lite makes from ``config``."""
    return [*(config.get(LITE_ENGINES) or {})] + [
        f"{ASYNC_PREFIX}{name}" for name in config.get(LITE_ASYNC_ENGINES) or {}
    ]


def type_name(extension: object) -> str:
    """``module.Class`` of an extension, for "not supported" messages."""
    return f"{type(extension).__module__}.{type(extension).__name__}"
