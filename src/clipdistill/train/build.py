"""Pieces the engine wires together: student construction, the student's forward for DDP, teacher
outputs (online or cached), optimiser groups and the learning-rate schedule.

`StudentForward` is the module DDP/FSDP wraps: one call returns every student tensor a step needs
(embeddings, scale, pooled features, tokens, and the MAE-style masked view for `mfd`, docs/methods.md section 2),
so gradient synchronisation sees a single forward per micro-batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from clipdistill.errors import UserError, unknown_name
from clipdistill.losses.base import Outputs
from clipdistill.models.base import ClipModel
from clipdistill.models.students import CachedTextStandIn, build_student  # noqa: F401 (the engine's names)
from clipdistill.train.config import OptimConfig


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

    def __init__(self, student: ClipModel, *, own_text: bool, pooled: bool, tokens: bool, mask_ratio: float | None) -> None:
        super().__init__()
        self.student = student
        self.own_text = own_text
        self.pooled = pooled
        self.tokens = tokens
        self.mask_ratio = mask_ratio
        self.visual = vision_transformer(student) if mask_ratio is not None else None
        if mask_ratio is not None and self.visual is None:
            raise UserError("term 'mfd' needs a ViT student (MAE-style token dropping); pick a vit-* preset or drop mfd")

    def forward(self, images: Tensor, text: Tensor | None = None, mask_seed: int | None = None) -> dict[str, Tensor]:
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
def online_teacher_outputs(teacher: ClipModel, images: Tensor, captions: list[str] | None, *, pooled: bool,
                           image_tokens: bool, text_tokens: bool) -> Outputs:
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


def cached_teacher_outputs(batch: dict, scale: float, device: torch.device) -> Outputs:
    get = (lambda k: batch[k].to(device) if k in batch else None)  # noqa: E731
    extra = {k: v.to(device) for k, v in batch.get("teacher_extra", {}).items()}
    return Outputs(image=get("teacher_image"), text=get("teacher_text"), scale=torch.tensor(float(scale), device=device),
                   image_pooled=get("teacher_pooled"), extra=extra)


def concat_outputs(parts: list[Outputs]) -> Outputs:
    """Micro-batch outputs joined along the batch (0-dim tensors from the first part)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    changes = {name: torch.cat([getattr(p, name) for p in parts]) for name, v in first.tensors().items() if v.ndim > 0}
    extra = {k: torch.cat([p.extra[k] for p in parts]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
             for k, v in first.extra.items()}
    return first.replace(**changes, extra=extra)


# --- optimiser --------------------------------------------------------------------------------------


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # open_clip's rule: no weight decay on gains, biases, norms and the logit scale.
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(student: nn.Module, distiller: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: "student", "student_no_decay" and the Distiller's groups, with cfg.groups overrides."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"name": "student", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "student_no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        *distiller.param_groups(cfg.lr, cfg.weight_decay),
    ]
    groups = [g for g in groups if g["params"]]
    known = [g["name"] for g in groups]
    for name, override in cfg.groups.items():
        if name not in known:
            raise unknown_name("optimiser group in optim.groups", name, known)
        bad = set(override) - {"lr", "weight_decay"}
        if bad:
            raise UserError(f"optim.groups.{name} has no setting '{sorted(bad)[0]}'; valid: lr, weight_decay")
        group = next(g for g in groups if g["name"] == name)
        group.update({k: float(v) for k, v in override.items()})
    return groups


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of every group's lr after `step` optimiser steps: linear warmup, then cosine (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def data_filter(data) -> tuple[frozenset[int] | None, frozenset[str] | None]:
    """(labels, keys) kept by `data.filter` and `data.keep` (a `DataConfig`); None where unfiltered.

    `filter` (e.g. classes=base) applies to the classification sets of `data.train` and `data.unpaired` (their labels select
    images and never reach a loss); caption sets in the same run pass unfiltered. `keep` is a keep-list
    file with one sample key per line (`clipdistill balance` writes one).
    """
    from clipdistill.data.shards import dataset_info
    from clipdistill.eval.base2novel import parse_data_filter

    labels = None
    if data.filter:
        sets = []
        for spec in [*data.train, *data.unpaired]:
            name, _, _ = spec.partition(":")
            folder = Path(name).expanduser()
            info = dataset_info(folder.name, folder.parent) if (folder / "dataset_type.txt").exists() else None
            if info is None and "/" not in name and not any(ch in name for ch in "*?["):
                info = dataset_info(name, data.root)
            if info is not None and info.kind == "classification":
                sets.append(frozenset(parse_data_filter(data.filter, info, data.split_seed)))
        if not sets:
            raise UserError(f"data.filter = {data.filter!r} needs a classification set in data.train or data.unpaired (e.g. cifar10:train); got {data.train + data.unpaired}")
        if len(set(sets)) > 1:
            raise UserError(f"data.filter = {data.filter!r} selects different classes in {data.train + data.unpaired}; filter one classification set per run")
        labels = sets[0]
    keys = None
    if data.keep:
        path = Path(data.keep).expanduser()
        if not path.is_file():
            raise UserError(f"data.keep = '{path}' does not exist; pass a keep-list (e.g. keep.txt from `clipdistill balance`)")
        keys = frozenset(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if not keys:
            raise UserError(f"data.keep = '{path}' lists no sample key; rerun `clipdistill balance` or drop data.keep")
    return labels, keys
