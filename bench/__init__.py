"""Benchmarks of flask-staleguard against bare Flask-SQLAlchemy and ``pool_pre_ping``.

Run ``python -m bench`` from the repository root (``--help`` for the options); see
``bench/README.md`` for what each scenario measures and how to read the output.
"""
