"""Reporting: the ``flask staleguard`` commands and the plain functions behind
them (pool snapshot, server facts, ``check``, the path-timer probe), their
formatting, and the JSON documents they print.
"""
