"""Benchmarks of flask-staleguard against bare Flask-SQLAlchemy and ``pool_pre_ping``.

Run ``python -m bench`` from the repository root (``--help`` for the options); see
``bench/README.md`` for what each scenario measures and how to read the output.
"""

from pathlib import Path

#: The repository root: ``tests/`` there holds the private server and the proxy.
REPO = Path(__file__).resolve().parent.parent
