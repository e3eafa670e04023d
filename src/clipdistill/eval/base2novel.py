"""Base-to-novel generalisation (issue "evaluation protocols"; docs/methods.md sections 5 and 10; the protocol of
CoOp/CoCoOp and PromptKD that ComKD-CLIP reports).

The class list is split into base = the first ceil(C/2) classes in the dataset's class order and
novel = the rest (CoOp's `subsample_classes`), or by a seeded random permutation with `seed`.
`base_acc1` is zero-shot top-1 on base-class images against base-class prompts only, `novel_acc1`
likewise on novel classes, and `hm` their harmonic mean 2 b n / (b + n).

`parse_data_filter("classes=base", info)` gives the label set a distillation run keeps, so a student
can be distilled on base-class images only and measured on novel classes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from clipdistill.data.shards import DatasetInfo, Sample
from clipdistill.errors import UserError, unknown_name
from clipdistill.eval.zeroshot import class_embeddings, encode_labelled_images, zeroshot_logits
from clipdistill.models.base import ClipModel

FILTER_HELP = "use classes=base, classes=novel or classes=NAME,NAME (or indices)"


def split_classes(n_classes: int, seed: int | None = None) -> tuple[list[int], list[int]]:
    """(base, novel) class indices, disjoint, covering 0..n_classes-1, each sorted.

    seed None: base = the first ceil(n/2) classes in dataset order. A seed: a random half (same rule
    for the sizes), reproducible for that seed.
    """
    if n_classes < 2:
        raise UserError(f"base-to-novel needs at least 2 classes, the dataset has {n_classes}")
    order = list(range(n_classes))
    if seed is not None:
        random.Random(seed).shuffle(order)
    m = math.ceil(n_classes / 2)
    return sorted(order[:m]), sorted(order[m:])


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def _restricted_acc1(image_emb: Tensor, labels: Tensor, class_emb: Tensor, classes: Sequence[int]) -> float:
    """Top-1 of the images whose label is in `classes`, competing among those classes' prompts only."""
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    keep = torch.isin(labels, cls)
    if not keep.any():
        raise UserError("no evaluated image belongs to one side of the base/novel split; use a smaller --every")
    predicted = cls[zeroshot_logits(image_emb[keep], class_emb[cls]).argmax(dim=1)]
    return (predicted == labels[keep]).float().mean().item()


def base2novel_metrics(image_emb: Tensor, labels: Tensor, class_emb: Tensor, base: Sequence[int],
                       novel: Sequence[int]) -> dict[str, float]:
    """`base_acc1`, `novel_acc1`, `hm` from N x d image embeddings, N labels and C x d class embeddings."""
    if set(base) & set(novel):
        raise ValueError("base and novel classes overlap")
    labels = torch.as_tensor(labels, dtype=torch.long)
    b = _restricted_acc1(image_emb, labels, class_emb, base)
    n = _restricted_acc1(image_emb, labels, class_emb, novel)
    return {"base_acc1": b, "novel_acc1": n, "hm": harmonic_mean(b, n)}


def base2novel(model: ClipModel, samples: Iterable[Sample], classnames: Sequence[str], templates: Sequence[str], *,
               seed: int | None = None, batch_size: int = 64, class_emb: Tensor | None = None,
               progress: bool = False, total: int | None = None) -> dict[str, float]:
    """Base/novel zero-shot top-1 and HM of `model` on labelled `samples` (see module docstring)."""
    base, novel = split_classes(len(classnames), seed)
    if class_emb is None:
        class_emb = class_embeddings(model, classnames, templates, progress=progress)
    images, labels = encode_labelled_images(model, samples, batch_size=batch_size, progress=progress, total=total)
    if len(labels) == 0:
        raise UserError("no readable samples to evaluate; check the dataset's shards (see the skipped count)")
    return base2novel_metrics(images, labels, class_emb, base, novel)


def parse_data_filter(spec: str | None, info: DatasetInfo, split_seed: int | None = None) -> set[int] | None:
    """The label set a `--data-filter` keeps (None: no filter), for `iter_samples(..., labels=...)`.

    `classes=base` / `classes=novel`: the halves of `split_classes` (with `split_seed`);
    `classes=cat,dog` or `classes=0,3`: those classes by name or index.
    """
    if spec is None or not spec.strip():
        return None
    key, sep, value = spec.strip().partition("=")
    if key.strip() != "classes" or not sep or not value.strip():
        raise UserError(f"unknown data filter '{spec}'; {FILTER_HELP}")
    if info.kind != "classification" or not info.classnames:
        raise UserError(f"data filter '{spec}' needs a classification dataset with classnames.txt; '{info.name}' is {info.kind}")
    value = value.strip()
    if value in ("base", "novel"):
        base, novel = split_classes(len(info.classnames), split_seed)
        return set(base if value == "base" else novel)
    keep = set()
    for item in (v.strip() for v in value.split(",")):
        if item.isdigit():
            if int(item) >= len(info.classnames):
                raise UserError(f"class index {item} out of range; '{info.name}' has {len(info.classnames)} classes")
            keep.add(int(item))
        elif item in info.classnames:
            keep.add(info.classnames.index(item))
        else:
            raise unknown_name("class", item, info.classnames)
    return keep
