"""The deprecated ``__version__`` attribute, kept until 0.2."""

from __future__ import annotations

import importlib.metadata

import pytest

import flask_staleguard


def test_version_attribute_is_deprecated() -> None:
    with pytest.deprecated_call(match="__version__"):
        version = flask_staleguard.__version__

    assert version == importlib.metadata.version("flask-staleguard")


def test_other_missing_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = flask_staleguard.no_such_name
