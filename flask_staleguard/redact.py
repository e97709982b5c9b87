"""Keep passwords out of everything the commands print."""

from __future__ import annotations

import urllib.parse

import sqlalchemy as sa


def one_line(error: BaseException, url: sa.engine.URL) -> str:
    """The driver's message for ``error`` on one line, with the password masked."""
    original = getattr(error, "orig", None) or error
    text = " ".join(str(original).split()) or type(original).__name__
    return mask(text, url)


def mask(text: str, url: sa.engine.URL) -> str:
    """``text`` with every spelling of ``url``'s password replaced by ``***``."""
    password = url.password
    if not password:
        return text
    secret = str(password)
    for spelling in {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
    }:
        text = text.replace(spelling, "***")
    return text
