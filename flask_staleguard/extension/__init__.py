"""The Flask glue: the :class:`~.staleguard.StaleGuard` extension, its per-app
state, its ``STALEGUARD_*`` keys, Flask-SQLAlchemy's engines, and the clean-up at
the end of each app context (leftover sessions, leaked connections).
"""
