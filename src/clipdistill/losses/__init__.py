"""Distillation loss terms, registered by name (see `clipdistill.losses.base`).

Importing this package registers every built-in term.
"""

from clipdistill.losses import (  # noqa: F401  (imports register the terms)
    clip,
    clip_cid,
    clip_kd,
    comkd,
    dclip,
    ensemble,
    relational,
    siglip,
    tinyclip,
)
from clipdistill.losses.base import NEEDS, TERMS, Outputs, Term, TermContext, get_term, register_term
from clipdistill.losses.config import LossConfig, load_loss_config, parse_loss_config
from clipdistill.losses.distiller import Distiller

__all__ = [
    "NEEDS",
    "TERMS",
    "Distiller",
    "LossConfig",
    "Outputs",
    "Term",
    "TermContext",
    "get_term",
    "load_loss_config",
    "parse_loss_config",
    "register_term",
]
