"""The calling convention shared by every distillation term, and the term registry.

Every term is an `nn.Module` subclass of `Term`, registered by name with `@register_term`. The
`Distiller` (losses/distiller.py) builds the terms a config names, gathers features across ranks
once (docs/methods.md section 0: all_gather, local slice keeps its gradient), and calls each term with the
full-batch `Outputs` of the student and the teacher. A term returns a dict of named scalars whose
entry under the term's own name is the value that gets weighted; the others (`"crd/i2t"`) are logged.

Needs. A term declares what it needs as a set of strings from `NEEDS`; the config is checked
against them and the teacher mode before training starts (`check_needs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError, unknown_name

NEEDS: dict[str, str] = {
    "teacher": "teacher image/text embeddings (online or cached)",
    "teacher_text": "teacher text embeddings of the batch captions (online text tower or cache)",
    "teacher_online": "the teacher model running online (not only a cache)",
    "student_text": "a student text tower (not the teacher's frozen text tower)",
    "student_pooled": "the student's pooled pre-projection image features",
    "teacher_pooled": "the teacher's pooled pre-projection image features",
    "image_tokens": "image patch tokens from the student and the teacher",
    "teacher_image_tokens": "the teacher's image patch tokens",
    "text_tokens": "the teacher's text token features",
    "masked_view": "a masked student view (ViT student: MAE-style token dropping)",
    "cluster_centres": "k-means centres and per-sample pseudo-labels (clipdistill cluster)",
}

DEFAULT_GROUP = "distiller"  # the optimiser group of the shared projectors and of most terms' parameters


@dataclass
class Outputs:
    """One model's outputs for a batch of N image-caption pairs (gathered over ranks when distributed).

    image, text: raw embeddings N x d (text may be None for image-only students using teacher text).
    scale: the model's scale s = exp(logit_scale) (0-dim tensor).
    bias: the logit bias b of a sigmoid (SigLIP-style) model (0-dim tensor, `ClipModel.logit_bias()`);
    None for softmax models. Only the sigmoid terms read it (`siglip`, `sigmoid_kd`); every softmax term
    ignores it, since a constant added to every logit cancels in a row or column softmax
    (docs/methods.md section 14). Like `scale` it is never gathered over ranks.
    Optional: pooled pre-projection features, token features (N x L x w), text token mask,
    `image_masked` (embedding of a masked view), `labels` (pseudo-labels, N), `index` (sample ids).
    `members`: an ensemble teacher's per-member outputs (normalised image and text embeddings, each
    member's own scale), in member order; the fields above are then those of one chosen member
    (`teacher.member`), which every term but `ensemble_kd` distils (docs/methods.md section 7.1).
    """

    image: Tensor | None  # None only for the text-only part of a batch (a text corpus)
    text: Tensor | None
    scale: Tensor
    image_pooled: Tensor | None = None
    text_pooled: Tensor | None = None
    image_tokens: Tensor | None = None
    text_tokens: Tensor | None = None
    text_mask: Tensor | None = None
    image_masked: Tensor | None = None
    labels: Tensor | None = None
    bias: Tensor | None = None
    extra: dict = field(default_factory=dict)
    members: tuple[Outputs, ...] = ()

    @property
    def image_n(self) -> Tensor:
        return F.normalize(self.image, dim=-1)

    @property
    def text_n(self) -> Tensor:
        return F.normalize(self.text, dim=-1)

    def tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        }

    def replace(self, **changes) -> Outputs:
        return replace(self, **changes)

    def detach(self) -> Outputs:
        members = tuple(m.detach() for m in self.members)
        return self.replace(**{k: v.detach() for k, v in self.tensors().items()}, members=members)


@dataclass
class TermContext:
    """What a term may use from its owner when it is built.

    student_dim, teacher_dim: embedding widths. `projector(modality, own=False)` returns the
    Distiller's shared linear projector d_s -> d_t (with bias) for "image" or "text", created on
    first use (or a private one with own=True); it returns None when no projection is needed.
    """

    student_dim: int
    teacher_dim: int
    projector: Callable[..., nn.Module | None]
    student_pooled_dim: int | None = None
    teacher_pooled_dim: int | None = None


class Term(nn.Module):
    """Base of every loss term. Subclasses set the class attributes and implement `forward`."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    default_weight: ClassVar[float] = 1.0
    source: ClassVar[str] = ""
    # Option names this term accepts, with defaults; unknown options are refused at config load.
    options: ClassVar[dict[str, object]] = {}
    required_options: ClassVar[tuple[str, ...]] = ()
    # Caption-less images in a mixed batch (data.unpaired): "none" = the term sees only the image-caption
    # pairs; "images" = the term is defined on images alone and also runs on the unpaired images (with
    # text None); a term may instead override `unpaired_loss` (e.g. relational: unpaired images as queries).
    unpaired: ClassVar[str] = "none"
    # The optimiser group of this term's own parameters (a class attribute: a run's group names, which
    # optim.groups may override, are known when its config is loaded, before any model is built).
    group: ClassVar[str] = DEFAULT_GROUP

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__()
        unknown = set(opts) - set(self.options)
        if unknown:
            raise UserError(
                f"term '{self.name}' has no option '{sorted(unknown)[0]}'; its options: {', '.join(sorted(self.options)) or 'none'}"
            )
        missing = [o for o in self.required_options if opts.get(o) is None]
        if missing:
            raise UserError(
                f"term '{self.name}' needs option '{missing[0]}'; set losses.{self.name}.{missing[0]} in the config"
            )
        self.opts = {**self.options, **opts}
        self.ctx = ctx

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def unpaired_loss(
        self, student_u: Outputs, teacher_u: Outputs | None, student: Outputs, teacher: Outputs | None
    ) -> dict[str, Tensor] | None:
        """The term on the unpaired part of a mixed batch, given the image-caption part (`student`,
        `teacher`) for candidates: caption-less images (`student_u.text` None) or corpus texts without
        images (`student_u.image` None). Returns a dict like `forward` (its own name's entry is weighted)
        or None when the term does not use that part. Default: `forward(student_u, teacher_u)` for
        images when `unpaired == "images"`; texts only where a term says how (fd, relational)."""
        if self.unpaired != "images" or student_u.image is None:
            return None
        return self(student_u, teacher_u)

    @property
    def faithful(self) -> bool:
        return bool(self.opts.get("faithful", False))

    def update(self, student: Outputs, teacher: Outputs | None) -> None:
        """Called after the optimiser step's loss (no grad); e.g. to enqueue a memory bank."""

    def update_unpaired(self, student_u: Outputs, teacher_u: Outputs | None) -> None:
        """Like `update`, for the unpaired part of a mixed batch (images or texts; after `update`)."""

    def param_group(self) -> str:
        """Name of the optimiser parameter group for this term's own parameters."""
        return self.group


TERMS: dict[str, type[Term]] = {}


def register_term(cls: type[Term]) -> type[Term]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in TERMS and TERMS[cls.name] is not cls:
        raise ValueError(f"term '{cls.name}' registered twice")
    unknown = set(cls.needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"term '{cls.name}' declares unknown needs {sorted(unknown)}")
    TERMS[cls.name] = cls
    return cls


def get_term(name: str) -> type[Term]:
    from clipdistill import losses  # noqa: F401  (imports register the built-in terms)

    if name not in TERMS:
        raise unknown_name("loss term", name, list(TERMS))
    return TERMS[name]
