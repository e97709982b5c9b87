"""OpenTelemetry metrics (``flask-staleguard[otel]``): :func:`instrument` an app
or a :func:`~flask_staleguard.protect`\\ ed engine.
"""

from __future__ import annotations

from .metrics.otel import instrument as instrument
