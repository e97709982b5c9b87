"""flask-staleguard: no more "MySQL server has gone away" from idle connections."""

from __future__ import annotations

import typing as t

from .core.protect import protect as protect
from .errors import ConfigError as ConfigError
from .errors import ConnectionReclaimed as ConnectionReclaimed
from .errors import ConnectRejected as ConnectRejected
from .errors import LeakError as LeakError
from .extension.staleguard import StaleGuard as StaleGuard
from .report.snapshot import pool_snapshot as pool_snapshot


def __getattr__(name: str) -> t.Any:
    if name == "__version__":
        import importlib.metadata
        import warnings

        warnings.warn(
            "The '__version__' attribute is deprecated and will be removed in"
            " flask-staleguard 0.2. Use feature detection or"
            " 'importlib.metadata.version(\"flask-staleguard\")' instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.metadata.version("flask-staleguard")

    raise AttributeError(name)
