"""A teacher ensemble as one `ClipModel` (docs/methods.md section 7.1; MobileCLIP, Vasu et al., CVPR 2024).

MobileCLIP's teacher is two CLIP models. Its stored image embedding is the members' L2-normalised
embeddings concatenated, and so is this model's: for K members of widths d_1..d_K,

    encode_image(x) = [ v^_1 ; ... ; v^_K ]    (width d_1 + ... + d_K, norm sqrt(K))

and the same for text. `encode_*(normalize=True)` re-normalises the concatenation, so the cosine of two
ensemble embeddings is the mean of the members' cosines. Evaluation (zero-shot, retrieval, linear probe)
uses these embeddings. Training does not: the Distiller sees each member's embeddings and scale
(`losses.ensemble`).

Each member keeps its own preprocessing and tokenizer. `preprocess` returns one flat tensor per image, the
members' preprocessed images flattened and joined in order. `tokenize` returns the members' token ids
side by side, after K leading columns that hold each member's token length. `image_features` and
`text_features` unpack these. A 4-D image batch is accepted only when every member shares one
`image_config`. `image_config` is the first member's; it describes the ensemble's preprocessing only in
that case. The ensemble has no pooled features or tokens of its own (a term that reads them gets the
chosen member's in training).

Spec: `ensemble:SPEC+SPEC` (models/factory.py), or a list in a run config (`teacher.spec: [SPEC, SPEC]`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from clipdistill.data.teacher_cache_format import ensemble_weights, weights_hash
from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel, Features


class EnsembleModel(ClipModel):
    """K member `ClipModel`s as one encoder pair whose embeddings are the members' normalised ones, concatenated."""

    def __init__(self, members: Sequence[ClipModel]) -> None:
        super().__init__()
        if not members:
            raise UserError("an ensemble needs at least one member spec; write e.g. 'ensemble:SPEC+SPEC'")
        self.members = nn.ModuleList(members)
        self.name = "ensemble(" + ",".join(m.name for m in members) + ")"
        self.embed_dim = sum(int(m.embed_dim) for m in members)
        self.image_config = members[0].image_config
        self.shared_image_config = all(m.image_config == members[0].image_config for m in members)
        self.max_scale = max(float(m.max_scale) for m in members)  # the members' scales, not clamped again

    @property
    def widths(self) -> list[int]:
        return [int(m.embed_dim) for m in self.members]

    # --- images ---------------------------------------------------------------------------------------

    @property
    def preprocess(self) -> Callable[[Image.Image], Tensor]:
        """One image -> the members' preprocessed images, each flattened, joined in member order (1-D)."""
        transforms = [m.preprocess for m in self.members]
        return lambda image: torch.cat([t(image).reshape(-1) for t in transforms])

    def member_images(self, images: Tensor) -> list[Tensor]:
        """Each member's image batch from a packed batch (N x sum of C*H*W) or, when the members share one
        preprocessing, from an ordinary N x 3 x H x W batch."""
        if images.ndim == 4:
            if not self.shared_image_config:
                raise ValueError(
                    "this ensemble's members preprocess images differently; pass images packed by "
                    "`ensemble.preprocess` (or each member's own view), not one N x 3 x H x W batch"
                )
            return [images] * len(self.members)
        shapes = [(3, m.image_config.size, m.image_config.size) for m in self.members]
        sizes = [math.prod(s) for s in shapes]
        if images.ndim != 2 or images.shape[1] != sum(sizes):
            raise ValueError(
                f"packed ensemble images must be N x {sum(sizes)} (members {shapes}), got {tuple(images.shape)}"
            )
        parts = torch.split(images, sizes, dim=1)
        return [p.reshape(-1, *s) for p, s in zip(parts, shapes)]

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        feats = [m.image_features(x) for m, x in zip(self.members, self.member_images(images))]
        return Features(embedding=torch.cat([f.normalized for f in feats], dim=-1))

    # --- text -----------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> Tensor:
        """[lengths (K columns, repeated per row) | member 1's ids | ... | member K's ids] (long)."""
        ids = [m.tokenize(texts).long() for m in self.members]
        lengths = torch.tensor([t.shape[1] for t in ids], dtype=torch.long).expand(len(texts), -1)
        return torch.cat([lengths, *ids], dim=1)

    def member_tokens(self, text: Tensor) -> list[Tensor]:
        k = len(self.members)
        if text.ndim != 2 or text.shape[1] < k:
            raise ValueError(
                f"ensemble tokens must come from `ensemble.tokenize`, got shape {tuple(text.shape)}"
            )
        lengths = [int(n) for n in text[0, :k]] if len(text) else [0] * k
        if sum(lengths) != text.shape[1] - k:
            raise ValueError(
                "ensemble tokens must come from `ensemble.tokenize` (member lengths do not add up)"
            )
        return list(torch.split(text[:, k:], lengths, dim=1))

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        feats = [m.text_features(t) for m, t in zip(self.members, self.member_tokens(text))]
        return Features(embedding=torch.cat([f.normalized for f in feats], dim=-1))

    # --- scale and identity ---------------------------------------------------------------------------

    def raw_logit_scale(self) -> Tensor:
        """log of the members' mean scale: ensemble logits are that scale times the mean member cosine.
        Evaluation ranks by cosine alone; training uses each member's own scale."""
        scales = torch.stack([m.logit_scale().reshape(()) for m in self.members])
        return scales.mean().log()

    def fingerprint(self) -> str:
        """The members' weight hashes, in order (the teacher cache's and the evaluation caches' identity)."""
        return ensemble_weights([weights_hash(m) for m in self.members])

    def describe(self) -> dict:
        return {**super().describe(), "members": [m.describe() for m in self.members]}


def members_of(teacher: ClipModel) -> list[ClipModel]:
    """An ensemble's members in order; a single teacher is its own only member."""
    return list(teacher.members) if isinstance(teacher, EnsembleModel) else [teacher]


def member_model(teacher: ClipModel, index: int) -> ClipModel:
    """Member `index` of an ensemble teacher; a single teacher is its own (only) member 0."""
    members = members_of(teacher)
    if not 0 <= index < len(members):
        raise UserError(
            f"teacher.member = {index} but the teacher has {len(members)} member(s); pick 0..{len(members) - 1}"
        )
    return members[index]


def from_spec(rest: str) -> EnsembleModel:
    from clipdistill.models.factory import create_model, ensemble_members

    return EnsembleModel([create_model(spec) for spec in ensemble_members(rest)])


__all__ = ["EnsembleModel", "from_spec", "member_model", "members_of"]
