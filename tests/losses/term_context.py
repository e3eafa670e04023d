"""A stand-alone `TermContext` for testing terms without a Distiller (not collected by pytest)."""

from __future__ import annotations

from torch import nn

from clipdistill.losses.base import TermContext


def make_ctx(d_s: int, d_t: int) -> TermContext:
    """Shared projectors per modality, created on first use (None when widths match), as the Distiller does."""
    shared: dict[str, nn.Module] = {}

    def projector(modality: str, own: bool = False):
        if d_s == d_t:
            return None
        return nn.Linear(d_s, d_t) if own else shared.setdefault(modality, nn.Linear(d_s, d_t))

    return TermContext(d_s, d_t, projector)
