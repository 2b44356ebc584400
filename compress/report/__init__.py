"""Turn report.json into Markdown and terminal tables; nothing here computes a measurement."""

from compress.report.html import render_html
from compress.report.markdown import render_markdown
from compress.report.terminal import print_summary

__all__ = ["print_summary", "render_html", "render_markdown"]
