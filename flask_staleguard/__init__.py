"""flask-staleguard: no more "MySQL server has gone away" from idle connections."""

from __future__ import annotations

from .errors import ConnectionReclaimed as ConnectionReclaimed
from .errors import LeakError as LeakError
from .extension import StaleGuard as StaleGuard
from .inspect import pool_snapshot as pool_snapshot
from .settings import ConfigError as ConfigError

__version__ = "0.1.0.dev0"
