"""The reports' JSON documents: their type and the version of their schema."""

from __future__ import annotations

import typing as t

#: The version of the JSON schema (``docs/cli.md``); it changes only when a
#: field is removed or changes meaning (added fields keep it).
SCHEMA = 1

#: One bind's facts, as the JSON documents have them.
Report = dict[str, t.Any]
