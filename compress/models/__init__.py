"""Where models come from: built-in nets, torchvision, `module:function` factories, artifacts, pickles."""

from compress.models.loader import (
    DEFAULT_MODEL,
    LoadedModel,
    build_from_arch,
    load_model,
    load_state_file,
)

__all__ = ["DEFAULT_MODEL", "LoadedModel", "build_from_arch", "load_model", "load_state_file"]
