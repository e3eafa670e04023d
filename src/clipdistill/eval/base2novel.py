"""Base-to-novel generalisation (issue "evaluation protocols"; docs/methods.md sections 5 and 10; the protocol of
CoOp/CoCoOp and PromptKD that ComKD-CLIP reports).

The class list is split into base = the first ceil(C/2) classes in the dataset's class order and
novel = the rest (CoOp's `subsample_classes`), or by a seeded random permutation with `seed`.
`base_acc1` is zero-shot top-1 on base-class images against base-class prompts only, `novel_acc1`
likewise on novel classes, and `hm` their harmonic mean 2 b n / (b + n).

`parse_data_filter("classes=base", info)` (in `data.filter`, re-exported here) gives the label set a
distillation run keeps, so a student can be distilled on base-class images only and measured on novel
classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from clipdistill.data.filter import FILTER_HELP, parse_data_filter, split_classes
from clipdistill.data.shards import Sample
from clipdistill.errors import UserError
from clipdistill.eval.zeroshot import class_embeddings, encode_labelled_images, zeroshot_logits
from clipdistill.models.base import ClipModel

__all__ = [
    "FILTER_HELP",
    "base2novel",
    "base2novel_metrics",
    "harmonic_mean",
    "parse_data_filter",
    "split_classes",
]


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def _restricted_acc1(image_emb: Tensor, labels: Tensor, class_emb: Tensor, classes: Sequence[int]) -> float:
    """Top-1 of the images whose label is in `classes`, competing among those classes' prompts only."""
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    keep = torch.isin(labels, cls)
    if not keep.any():
        raise UserError(
            "no evaluated image belongs to one side of the base/novel split; use a smaller --every"
        )
    predicted = cls[zeroshot_logits(image_emb[keep], class_emb[cls]).argmax(dim=1)]
    return (predicted == labels[keep]).float().mean().item()


def base2novel_metrics(
    image_emb: Tensor, labels: Tensor, class_emb: Tensor, base: Sequence[int], novel: Sequence[int]
) -> dict[str, float]:
    """`base_acc1`, `novel_acc1`, `hm` from N x d image embeddings, N labels and C x d class embeddings."""
    if set(base) & set(novel):
        raise ValueError("base and novel classes overlap")
    labels = torch.as_tensor(labels, dtype=torch.long)
    b = _restricted_acc1(image_emb, labels, class_emb, base)
    n = _restricted_acc1(image_emb, labels, class_emb, novel)
    return {"base_acc1": b, "novel_acc1": n, "hm": harmonic_mean(b, n)}


def base2novel(
    model: ClipModel,
    samples: Iterable[Sample],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    seed: int | None = None,
    batch_size: int = 64,
    class_emb: Tensor | None = None,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """Base/novel zero-shot top-1 and HM of `model` on labelled `samples` (see module docstring)."""
    base, novel = split_classes(len(classnames), seed)
    if class_emb is None:
        class_emb = class_embeddings(model, classnames, templates, progress=progress)
    images, labels = encode_labelled_images(
        model, samples, batch_size=batch_size, progress=progress, total=total
    )
    if len(labels) == 0:
        raise UserError("no readable samples to evaluate; check the dataset's shards (see the skipped count)")
    return base2novel_metrics(images, labels, class_emb, base, novel)
