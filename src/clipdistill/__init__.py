"""clipdistill: distil large CLIP models into small, fast students."""

__version__ = "0.1.0"
