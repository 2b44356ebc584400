"""report.json: its versioned layout (schema), and Markdown, HTML and terminal tables of it; nothing here computes
a measurement.

The renderers are imported on first use (they pull in the method registry, hence torch), so that reading
`compress.report.schema` or `compress.report.budgets` stays fast."""

from __future__ import annotations

import importlib
from typing import Any

from compress.report.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "print_summary", "render_html", "render_markdown"]
_LAZY = {"render_html": "compress.report.html", "render_markdown": "compress.report.markdown",
         "print_summary": "compress.report.terminal"}


def __getattr__(name: str) -> Any:
    """`compress.report.render_html` and the others, imported when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compress.report' has no attribute {name!r}")
