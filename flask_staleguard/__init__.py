"""flask-staleguard: no more "MySQL server has gone away" from idle connections."""

from __future__ import annotations

from .errors import ConfigError as ConfigError
from .errors import ConnectionReclaimed as ConnectionReclaimed
from .errors import LeakError as LeakError
from .extension.staleguard import StaleGuard as StaleGuard
from .report.snapshot import pool_snapshot as pool_snapshot

__version__ = "0.1.0.dev0"
