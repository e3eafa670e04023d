"""Model adapters behind one CLIP-like interface (`ClipModel`), built from spec strings by `create_model`."""

from clipdistill.models.base import ClipModel, Features, ImageConfig
from clipdistill.models.factory import ModelSpec, create_model, parse_spec, register_adapter

__all__ = [
    "ClipModel",
    "Features",
    "ImageConfig",
    "ModelSpec",
    "create_model",
    "parse_spec",
    "register_adapter",
]
