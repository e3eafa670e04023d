"""Model spec strings, parsed in one place.

    openclip:ViT-B-32                 open_clip architecture, random initialisation
    openclip:ViT-B-32/laion2b_s34b_b79k   with a pretrained tag
    openclip:hf-hub:org/name          open_clip hub id
    openclip:ViT-B-32@/path/ckpt.pt   open_clip architecture with a local checkpoint file
    hf:/path/or/hub-id                Hugging Face transformers CLIPModel
    teacher:/path/to/dir              the composed offline teacher built by `clipdistill teacher build`
    student:preset-name               a registered student preset (random init)

Adapters register a prefix with `register_adapter`; the built-in ones are registered lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from clipdistill.errors import UserError, unknown_name
from clipdistill.models.base import ClipModel

_BUILTIN = {
    "openclip": "clipdistill.models.openclip:from_spec",
    "hf": "clipdistill.models.hf:from_spec",
    "teacher": "clipdistill.models.composed:from_spec",
    "student": "clipdistill.models.students:from_spec",
}
_ADAPTERS: dict[str, Callable[[str], ClipModel]] = {}


def register_adapter(prefix: str, builder: Callable[[str], ClipModel]) -> None:
    """Make `prefix:rest` specs build with `builder(rest)`."""
    _ADAPTERS[prefix] = builder


def _builder(prefix: str) -> Callable[[str], ClipModel]:
    if prefix in _ADAPTERS:
        return _ADAPTERS[prefix]
    if prefix in _BUILTIN:
        module, fn = _BUILTIN[prefix].split(":")
        return getattr(importlib.import_module(module), fn)
    raise unknown_name("model spec prefix", prefix, sorted(set(_BUILTIN) | set(_ADAPTERS)))


def check_spec(spec: str) -> Callable[[str], ClipModel]:
    """The builder of `spec`'s prefix (UserError for a spec without a known prefix), without building."""
    if ":" not in spec:
        raise UserError(
            f"model spec '{spec}' has no prefix; write e.g. 'openclip:ViT-B-32', 'hf:DIR', 'teacher:DIR' or 'student:NAME'"
        )
    return _builder(spec.split(":", 1)[0])


def create_model(spec: str) -> ClipModel:
    """Build a `ClipModel` from a spec string (see module docstring)."""
    builder = check_spec(spec)
    model = builder(spec.split(":", 1)[1])
    model.spec = spec
    return model
