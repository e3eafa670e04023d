"""Pieces the engine wires together: student construction, the student's forward for DDP and teacher
outputs (online or cached). The optimiser groups and the learning-rate schedule are in train/optim.py,
the data filter in data/filter.py.

`StudentForward` is the module DDP/FSDP wraps: one call returns every student tensor a step needs
(embeddings, scale, pooled features, tokens, and the MAE-style masked view for `mfd`, docs/methods.md section 2),
so gradient synchronisation sees a single forward per micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.data.filter import data_filter  # noqa: F401 (benchmarks/methods import it from here)
from clipdistill.data.teacher_cache_format import CacheInfo
from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.models.base import ClipModel
from clipdistill.models.students import CachedTextStandIn, build_student  # noqa: F401 (the engine's names)


def vision_transformer(model: ClipModel):
    """The open_clip `VisionTransformer` inside a student, or None (MFD needs one)."""
    from open_clip.transformer import VisionTransformer

    inner = getattr(model, "image", model)
    visual = getattr(getattr(inner, "model", None), "visual", None)
    return visual if isinstance(visual, VisionTransformer) else None


def masked_image_embedding(visual, images: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """Embedding of an MAE-style masked view: `ratio` of the patch tokens dropped per sample after the
    patch and positional embedding, class token kept (CLIP-KD MFD, docs/methods.md section 2)."""
    from clipdistill.losses.clip_kd import random_masking

    x = visual._embeds(images)
    prefix = 0 if getattr(visual, "class_embedding", None) is None else 1
    x = random_masking(x, ratio, num_prefix=prefix, generator=generator)
    pooled, _ = visual._pool(visual.transformer(x))
    return pooled @ visual.proj if visual.proj is not None else pooled


class StudentForward(nn.Module):
    """forward(images, text, mask_seed) -> the student's tensors for one micro-batch."""

    def __init__(
        self, student: ClipModel, *, own_text: bool, pooled: bool, tokens: bool, mask_ratio: float | None
    ) -> None:
        super().__init__()
        self.student = student
        self.own_text = own_text
        self.pooled = pooled
        self.tokens = tokens
        self.mask_ratio = mask_ratio
        self.visual = vision_transformer(student) if mask_ratio is not None else None
        if mask_ratio is not None and self.visual is None:
            raise UserError(
                "term 'mfd' needs a ViT student (MAE-style token dropping); pick a vit-* preset or drop mfd"
            )

    def forward(
        self, images: Tensor, text: Tensor | None = None, mask_seed: int | None = None
    ) -> dict[str, Tensor]:
        f = self.student.image_features(images, tokens=self.tokens)
        out = {"image": f.embedding, "scale": self.student.logit_scale()}
        if self.pooled:
            out["image_pooled"] = f.pooled
        if self.tokens:
            out["image_tokens"] = f.tokens
        if self.own_text and text is not None:
            t = self.student.text_features(text)
            out["text"] = t.embedding
            if self.pooled and t.pooled is not None:
                out["text_pooled"] = t.pooled
        if self.visual is not None and mask_seed is not None:
            gen = torch.Generator().manual_seed(int(mask_seed))
            out["image_masked"] = masked_image_embedding(self.visual, images, self.mask_ratio, gen)
        return out


def pooled_width(model: ClipModel, device: torch.device) -> int | None:
    """Width of the model's pooled image features (one blank image through it), None if it has none."""
    size = model.image_config.size
    with torch.no_grad():
        f = model.image_features(torch.zeros(1, 3, size, size, device=device))
    return None if f.pooled is None else int(f.pooled.shape[-1])


@torch.no_grad()
def online_teacher_outputs(
    teacher: ClipModel,
    images: Tensor,
    captions: list[str] | None,
    *,
    pooled: bool,
    image_tokens: bool,
    text_tokens: bool,
) -> Outputs:
    f = teacher.image_features(images, tokens=image_tokens)
    text = t = None
    if captions is not None:
        t = teacher.text_features(teacher.tokenize(captions).to(images.device), tokens=text_tokens)
        text = t.embedding.float()
    return Outputs(
        image=f.embedding.float(),
        text=text,
        scale=teacher.logit_scale().detach().float(),
        image_pooled=f.pooled.float() if pooled and f.pooled is not None else None,
        image_tokens=f.tokens.float() if image_tokens and f.tokens is not None else None,
        text_tokens=t.tokens.float() if t is not None and t.tokens is not None else None,
        text_mask=t.mask if t is not None else None,
    )


def teacher_views(teacher: ClipModel) -> dict:
    """The loader's teacher views (name -> image config): "teacher", or "teacher/k" per ensemble member
    (each member sees the same crop at its own preprocessing)."""
    from clipdistill.models.ensemble import EnsembleModel

    if not isinstance(teacher, EnsembleModel):
        return {"teacher": teacher.image_config}
    return {f"teacher/{k}": m.image_config for k, m in enumerate(teacher.members)}


def _unit(out: Outputs) -> Outputs:
    text = None if out.text is None else F.normalize(out.text, dim=-1)
    return out.replace(image=None if out.image is None else F.normalize(out.image, dim=-1), text=text)


@torch.no_grad()
def online_ensemble_outputs(
    members: list[ClipModel], views: list[Tensor], captions: list[str] | None, member: int, **wanted: bool
) -> Outputs:
    """An ensemble teacher's outputs (docs/methods.md section 7.1): every member on its own view, with its
    embeddings normalised (as the ensemble cache stores them) and its own scale, in `members`; member
    `member` also as the teacher's own fields, with the pooled features and tokens in `wanted`."""
    none = dict.fromkeys(wanted, False)
    parts = [
        _unit(online_teacher_outputs(m, x, captions, **(wanted if k == member else none)))
        for k, (m, x) in enumerate(zip(members, views))
    ]
    slim = tuple(Outputs(image=p.image, text=p.text, scale=p.scale) for p in parts)
    return parts[member].replace(members=slim)


def cached_ensemble_outputs(batch: dict, info: CacheInfo, member: int, device: torch.device) -> Outputs:
    """`cached_teacher_outputs` of an ensemble cache (`info`: its `CacheInfo`): each stored row split into
    the members' normalised embeddings, each member with its stored scale; member `member` (and its
    columns of the pooled features) also as the teacher's own fields."""
    whole = cached_teacher_outputs(batch, 0.0, device)
    cut = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    parts = tuple(
        Outputs(
            image=cut(whole.image, a, b),
            text=cut(whole.text, a, b),
            scale=torch.tensor(float(m["logit_scale"]), device=device),
        )
        for (a, b), m in zip(info.member_columns(), info.members)
    )
    a, b = info.member_columns("pooled_dim")[member]
    pooled = cut(whole.image_pooled, a, b)
    return parts[member].replace(image_pooled=pooled, extra=whole.extra, members=parts)


def cached_teacher_outputs(batch: dict, scale: float, device: torch.device) -> Outputs:
    get = lambda k: batch[k].to(device) if k in batch else None  # noqa: E731
    extra = {k: v.to(device) for k, v in batch.get("teacher_extra", {}).items()}
    return Outputs(
        image=get("teacher_image"),
        text=get("teacher_text"),
        scale=torch.tensor(float(scale), device=device),
        image_pooled=get("teacher_pooled"),
        extra=extra,
    )


def concat_outputs(parts: list[Outputs]) -> Outputs:
    """Micro-batch outputs joined along the batch (0-dim tensors from the first part)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    changes = {
        name: torch.cat([getattr(p, name) for p in parts])
        for name, v in first.tensors().items()
        if v.ndim > 0
    }
    extra = {
        k: torch.cat([p.extra[k] for p in parts]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
        for k, v in first.extra.items()
    }
    members = tuple(concat_outputs([p.members[k] for p in parts]) for k in range(len(first.members)))
    return first.replace(**changes, extra=extra, members=members)
