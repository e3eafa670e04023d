"""The distillation data filter (issue 9): which samples of the training data a run keeps.

`data.filter` (e.g. `classes=base`) keeps the images of some classes of the classification sets in
`data.train` and `data.unpaired` (their labels select images and never reach a loss); caption sets in
the same run pass unfiltered. `data.keep` is a keep-list file with one sample key per line
(`clipdistill balance` writes one). The loader applies both (`loader.keep_record`).

`parse_data_filter` and `split_classes` live here (data never depends on eval): the base/novel split
they make is the one `eval.base2novel` measures, and it imports them from here.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from clipdistill.data.shards import DatasetInfo, dataset_info
from clipdistill.errors import UserError, unknown_name

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
        raise UserError(
            f"data filter '{spec}' needs a classification dataset with classnames.txt; '{info.name}' is {info.kind}"
        )
    value = value.strip()
    if value in ("base", "novel"):
        base, novel = split_classes(len(info.classnames), split_seed)
        return set(base if value == "base" else novel)
    keep = set()
    for item in (v.strip() for v in value.split(",")):
        if item.isdigit():
            if int(item) >= len(info.classnames):
                raise UserError(
                    f"class index {item} out of range; '{info.name}' has {len(info.classnames)} classes"
                )
            keep.add(int(item))
        elif item in info.classnames:
            keep.add(info.classnames.index(item))
        else:
            raise unknown_name("class", item, info.classnames)
    return keep


def data_filter(data) -> tuple[frozenset[int] | None, frozenset[str] | None]:
    """(labels, keys) kept by `data.filter` and `data.keep` (a `train.config.DataConfig`); None where unfiltered."""
    return filter_labels(data), keep_keys(data.keep)


def filter_labels(data) -> frozenset[int] | None:
    """The class labels `data.filter` keeps in the classification sets of data.train and data.unpaired."""
    if not data.filter:
        return None
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
        raise UserError(
            f"data.filter = {data.filter!r} needs a classification set in data.train or data.unpaired "
            f"(e.g. cifar10:train); got {data.train + data.unpaired}"
        )
    if len(set(sets)) > 1:
        raise UserError(
            f"data.filter = {data.filter!r} selects different classes in {data.train + data.unpaired}; "
            "filter one classification set per run"
        )
    return sets[0]


def keep_keys(keep: str | None) -> frozenset[str] | None:
    """The sample keys listed in the keep-list file `keep` (data.keep), None without one."""
    if not keep:
        return None
    path = Path(keep).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.keep = '{path}' does not exist; pass a keep-list (e.g. keep.txt from `clipdistill balance`)"
        )
    keys = frozenset(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not keys:
        raise UserError(
            f"data.keep = '{path}' lists no sample key; rerun `clipdistill balance` or drop data.keep"
        )
    return keys
