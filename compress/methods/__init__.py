"""Compression methods, one module each, registered by name and config type."""

from compress.methods import alds, globalmp, pagcp  # noqa: F401  (register themselves)
from compress.methods.base import METHODS, Context, MethodSpec, Result, method_for_config

__all__ = ["METHODS", "Context", "MethodSpec", "Result", "method_for_config"]
