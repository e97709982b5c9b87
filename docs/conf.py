"""Sphinx configuration. Builds offline: no intersphinx, no remote images."""

from __future__ import annotations

import importlib.metadata

project = "flask-staleguard"
copyright = "flask-staleguard contributors"
release = importlib.metadata.version("flask-staleguard")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: `cli.md` and `benchmarks.md` are Markdown. Heading anchors let them link
# to their own sections as [text](#section-title).
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
# BindKey and PerBind are aliases: show their names in signatures, not what they
# expand to.
autodoc_type_aliases = {
    "BindKey": "flask_staleguard.extension.config.BindKey",
    "PerBind": "flask_staleguard.extension.config.PerBind",
}

# Offline, other projects' objects cannot be linked; their names stay plain text.
# Every reference to this project's own objects must resolve (sphinx-build -n).
nitpick_ignore_regex = [
    ("py:.*", r"(flask|werkzeug|sqlalchemy|prometheus_client|weakref|_thread)\..*"),
    ("py:.*", r"opentelemetry\..*"),
    ("py:class", r"(Flask|Response|CollectorRegistry|TypeAliasForwardRef)"),
    ("py:class", r"MeterProvider"),
    ("py:class", r"(t|sa)\..*"),
    # A string annotation of an alias, as autodoc renders it, quotes included.
    ("py:class", r"'flask_staleguard\.extension\.config\.BindKey'"),
]

html_theme = "furo"
html_title = f"flask-staleguard {version}"
html_static_path: list[str] = []
