"""Keep credentials out of everything the guard logs and prints.

A password can reach a driver in the URL's user info, in its query string
(``?password=...``, which PyMySQL and psycopg accept), in ``connect_args``, or
inside a DSN string (``host=db password=...``). :class:`Secrets` collects all of
them for a bind, renders its URL with each masked, and masks them in any text.
"""

from __future__ import annotations

import re
import typing as t
import urllib.parse

import sqlalchemy as sa

MASK = "***"

#: Option names whose values are credentials.
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|credential|api_?key", re.I)
#: Option names whose values are connection strings that may hold a password.
_DSN_NAME = re.compile(r"^(dsn|conninfo|connection_string|url)$", re.I)
#: ``password=...`` in a libpq or ODBC style connection string.
_DSN_PASSWORD = re.compile(
    r"""\b(?:password|passwd|pwd)\s*=\s*('(?:[^'\\]|\\.)*'|"[^"]*"|[^\s;]+)""", re.I
)
#: ``scheme://user:password@host`` in a URL-style connection string.
_URL_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]+)@")
#: Shorter secrets are masked as whole words only, so that a one-letter
#: password does not mangle every message.
_SHORT = 4


class Secrets:
    """The credentials one bind was configured with."""

    def __init__(
        self, url: sa.engine.URL, connect_args: t.Mapping[str, t.Any] | None = None
    ) -> None:
        found: set[str] = set()
        if url.password:
            found.add(str(url.password))
        for name, value in url.query.items():
            for item in value if isinstance(value, tuple) else (value,):
                found |= _secrets_in(name, item)
        found |= _secrets_in("connect_args", dict(connect_args or {}))
        spellings = set()
        for secret in found:
            spellings |= {
                secret,
                urllib.parse.quote(secret, safe=""),
                urllib.parse.quote_plus(secret),
            }
        # Longest first, so a secret inside another is not half masked.
        self._spellings = sorted(spellings, key=len, reverse=True)
        #: The URL with every credential masked: safe for logs and output.
        self.url = self.mask(_render(url))

    def mask(self, text: str) -> str:
        """``text`` with every spelling of every credential replaced by ``***``."""
        for spelling in self._spellings:
            if len(spelling) >= _SHORT:
                text = text.replace(spelling, MASK)
            else:
                text = re.sub(rf"(?<!\w){re.escape(spelling)}(?!\w)", MASK, text)
        return text

    def one_line(self, error: BaseException) -> str:
        """The driver's message for ``error`` on one line, credentials masked."""
        original = getattr(error, "orig", None) or error
        text = " ".join(str(original).split()) or type(original).__name__
        return self.mask(text)


def _secrets_in(name: str, value: t.Any) -> set[str]:
    """The credentials in option ``name``'s ``value``, looking into dicts."""
    if isinstance(value, t.Mapping):
        found: set[str] = set()
        for key, item in value.items():
            found |= _secrets_in(str(key), item)
        return found
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str) or not value:
        return set()
    if _SECRET_NAME.search(name):
        return {value}
    if _DSN_NAME.match(name):
        found = {m.strip("'\"") for m in _DSN_PASSWORD.findall(value)}
        found |= {urllib.parse.unquote(m) for m in _URL_PASSWORD.findall(value)}
        return {s for s in found if s}
    return set()


def _render(url: sa.engine.URL) -> str:
    """``url`` as text, the password and credential-bearing query values masked."""
    query: dict[str, t.Any] = {}
    for name, value in url.query.items():
        if _SECRET_NAME.search(name) or _DSN_NAME.match(name):
            value = MASK if isinstance(value, str) else tuple(MASK for _ in value)
        query[name] = value
    text = url.set(query=query).render_as_string(hide_password=True)
    return text.replace(urllib.parse.quote(MASK, safe=""), MASK)
