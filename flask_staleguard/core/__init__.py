"""The pool core: everything that guards a SQLAlchemy pool, with no Flask import.

:class:`~.guard.PoolGuard` wires its pieces to one engine's pool events: the
checks at checkout (:mod:`.checkout`, with the socket :mod:`.probe` and each
connection's :mod:`.lifetime`), the idle
:mod:`.budget` and its :mod:`.derive`\\ d engine options, leak tracking
(:mod:`.holders`), and disconnect reports (:mod:`.disconnects`). The server's
timeout comes from :mod:`.discovery`, every exchange under a :mod:`.deadline`.
"""
