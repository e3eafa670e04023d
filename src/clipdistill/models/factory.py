"""Model spec strings, parsed in one place (`parse_spec`, in the spirit of open_clip's `parse_model_name`).

    openclip:ViT-B-32                 open_clip architecture, random initialisation
    openclip:ViT-B-32/laion2b_s34b_b79k   with a pretrained tag
    openclip:hf-hub:org/name          open_clip hub id
    openclip:ViT-B-32@/path/ckpt.pt   open_clip architecture with a local checkpoint file
    openclip:/path/to/dir             a folder written by `clipdistill export` (open_clip `local-dir:` schema)
    hf:/path/or/hub-id                Hugging Face transformers CLIPModel
    teacher:/path/to/dir              the composed offline teacher built by `clipdistill teacher build`
    student:preset-name               a registered student preset (random init)
    student:preset-name@/path/ckpt.pt  with trained weights
    ensemble:SPEC+SPEC[+...]          a teacher ensemble: its members' normalised embeddings, concatenated

A spec is `KIND:REST`. For `openclip` and `student` the rest may end in `@CHECKPOINT` (a weights file);
an `openclip` architecture may carry a pretrained `/TAG` instead. Every other kind (`hf`, `teacher`,
adapters added by `register_adapter`) takes its rest whole. Adapters build from the rest, so that
`str(parse_spec(s)) == s` and `create_model` hands each builder exactly what the user wrote.

An `ensemble` rest is its member specs joined by `+`; it is split only where `+` is followed by a known
prefix and a colon (`+teacher:`, `+openclip:`), so a `+` inside a member's path or tag stays in that
member (`ensemble_members`, `ensemble_spec`). A run config writes the same ensemble as a list
(`teacher.spec: [SPEC, SPEC]`). Members are never ensembles themselves.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from clipdistill.errors import UserError, unknown_name
from clipdistill.models.base import ClipModel

_BUILTIN = {
    "openclip": "clipdistill.models.openclip:from_spec",
    "hf": "clipdistill.models.hf:from_spec",
    "teacher": "clipdistill.models.composed:from_spec",
    "student": "clipdistill.models.students:from_spec",
    "ensemble": "clipdistill.models.ensemble:from_spec",
}
_ADAPTERS: dict[str, Callable[[str], ClipModel]] = {}

CHECKPOINT_KINDS = ("openclip", "student")  # kinds whose spec may end in @CHECKPOINT
FOLDER_KINDS = ("hf", "teacher")  # kinds whose rest is a folder or hub id holding the weights
PATH_STARTS = ("/", "./", "../", "~")  # an openclip rest starting so is a folder, never ARCH/TAG
_OPENCLIP_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip's own schemas, taken whole


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec `kind:name[/tag][@checkpoint]` (`str()` gives the spec back)."""

    kind: str  # the prefix: openclip, hf, teacher, student, or a registered adapter's
    name: str  # architecture, preset, folder or hub id
    checkpoint: str | None = None  # `@FILE`: weights to load (openclip, student)
    tag: str | None = None  # `/TAG`: an open_clip pretrained tag

    @property
    def rest(self) -> str:
        """What follows `kind:`; the argument of the kind's builder."""
        tag = "" if self.tag is None else f"/{self.tag}"
        checkpoint = "" if self.checkpoint is None else f"@{self.checkpoint}"
        return f"{self.name}{tag}{checkpoint}"

    @property
    def is_folder(self) -> bool:
        """The weights are the named folder or hub id (hf, teacher, an openclip folder or hub id)."""
        if self.kind in FOLDER_KINDS:
            return True
        return self.kind == "openclip" and self.name.startswith((*PATH_STARTS, *_OPENCLIP_SCHEMAS))

    def with_checkpoint(self, checkpoint: object) -> ModelSpec:
        """The same model with the weights file `checkpoint` (in place of any checkpoint or tag)."""
        return dataclasses.replace(self, checkpoint=str(checkpoint), tag=None)

    def __str__(self) -> str:
        return f"{self.kind}:{self.rest}"


def _no_prefix(spec: str) -> UserError:
    return UserError(
        f"model spec '{spec}' has no prefix; write e.g. 'openclip:ViT-B-32', 'hf:DIR', 'teacher:DIR' or 'student:NAME'"
    )


def parse_spec(spec: str) -> ModelSpec:
    """`spec` as a `ModelSpec` (UserError, one line, for a spec without a prefix or with an empty `@`).

    Only the syntax is checked: an unknown prefix is refused by `check_spec`, an unknown architecture,
    preset, folder or tag by the kind's builder.
    """
    kind, sep, rest = str(spec).partition(":")
    if not sep or not kind:
        raise _no_prefix(spec)
    if kind not in CHECKPOINT_KINDS or (kind == "openclip" and rest.startswith(_OPENCLIP_SCHEMAS)):
        return ModelSpec(kind, rest)
    name, at, checkpoint = rest.partition("@")
    if at:
        if not name or not checkpoint:
            raise UserError(
                f"model spec '{spec}' needs a name before '@' and a weights file after it; "
                f"write e.g. '{kind}:NAME@/path/ckpt.pt', or drop the '@'"
            )
        return ModelSpec(kind, name, checkpoint=checkpoint)
    if kind == "openclip" and "/" in rest and not rest.startswith(PATH_STARTS):
        arch, _, tag = rest.partition("/")
        return ModelSpec(kind, arch, tag=tag)
    return ModelSpec(kind, rest)


def _prefixes() -> list[str]:
    return sorted(set(_BUILTIN) | set(_ADAPTERS))


def ensemble_members(rest: str) -> list[str]:
    """The member specs of an `ensemble:` spec's rest (UserError, one line, for an empty or nested one)."""
    kinds = "|".join(re.escape(k) for k in _prefixes())
    members = re.split(rf"\+(?=(?:{kinds}):)", rest)
    for member in members:
        if not member or parse_spec(member).kind == "ensemble":
            raise UserError(
                f"ensemble spec 'ensemble:{rest}' needs member specs joined by '+', none of them an ensemble; "
                "write e.g. 'ensemble:teacher:DIR_A+teacher:DIR_B'"
            )
    return members


def ensemble_spec(members: list[str]) -> str:
    """The `ensemble:` spec of a member list (a run config's `teacher.spec: [..]`); one member: its own spec."""
    members = [str(m) for m in members]
    if not members:
        raise UserError("teacher.spec = [] names no teacher; give one spec or a list of member specs")
    if len(members) == 1:
        parse_spec(members[0])
        return members[0]
    spec = "ensemble:" + "+".join(members)
    if ensemble_members(spec.partition(":")[2]) != members:
        raise UserError(
            f"ensemble members {members} cannot be joined with '+': a member holds '+KIND:'; rename that folder"
        )
    return spec


def register_adapter(prefix: str, builder: Callable[[str], ClipModel]) -> None:
    """Make `prefix:rest` specs build with `builder(rest)`."""
    _ADAPTERS[prefix] = builder


def _builder(prefix: str) -> Callable[[str], ClipModel]:
    if prefix in _ADAPTERS:
        return _ADAPTERS[prefix]
    if prefix in _BUILTIN:
        module, fn = _BUILTIN[prefix].split(":")
        return getattr(importlib.import_module(module), fn)
    raise unknown_name("model spec prefix", prefix, _prefixes())


def check_spec(spec: str) -> Callable[[str], ClipModel]:
    """The builder of `spec`'s prefix (UserError for a bad spec or an unknown prefix), without building."""
    return _builder(parse_spec(spec).kind)


def create_model(spec: str) -> ClipModel:
    """Build a `ClipModel` from a spec string (see module docstring)."""
    parsed = parse_spec(spec)
    model = _builder(parsed.kind)(parsed.rest)
    model.spec = spec
    return model
