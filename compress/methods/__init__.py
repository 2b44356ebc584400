"""Compression methods, one module each, registered by name and config type."""

from compress.methods import globalmp  # noqa: F401  (registers itself)
from compress.methods.base import METHODS, Context, MethodSpec, Result, method_for_config

__all__ = ["METHODS", "Context", "MethodSpec", "Result", "method_for_config"]
