"""Model adapters behind one CLIP-like interface (`ClipModel`), built from spec strings by `create_model`."""

from clipdistill.models.base import ClipModel, Features, ImageConfig
from clipdistill.models.factory import create_model, register_adapter

__all__ = ["ClipModel", "Features", "ImageConfig", "create_model", "register_adapter"]
