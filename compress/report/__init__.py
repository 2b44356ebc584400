"""report.json: its versioned layout (schema), and Markdown, HTML and terminal tables of it; nothing here computes
a measurement."""

from compress.report.html import render_html
from compress.report.markdown import render_markdown
from compress.report.schema import SCHEMA_VERSION
from compress.report.terminal import print_summary

__all__ = ["SCHEMA_VERSION", "print_summary", "render_html", "render_markdown"]
