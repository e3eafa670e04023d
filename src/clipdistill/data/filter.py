"""The distillation data filter (issue 9): which samples of the training data a run keeps.

`data.filter` (e.g. `classes=base`) keeps the images of some classes of the classification sets in
`data.train` and `data.unpaired` (their labels select images and never reach a loss); caption sets in
the same run pass unfiltered. `data.keep` is a keep-list file with one sample key per line
(`clipdistill balance` writes one). The loader applies both (`loader.keep_record`).

The class names behind `classes=...` are parsed by `eval.base2novel.parse_data_filter` (the same
base/novel split the evaluation measures); it is imported where it is used, so importing `data` never
imports `eval`.
"""

from __future__ import annotations

from pathlib import Path

from clipdistill.data.shards import dataset_info
from clipdistill.errors import UserError


def data_filter(data) -> tuple[frozenset[int] | None, frozenset[str] | None]:
    """(labels, keys) kept by `data.filter` and `data.keep` (a `train.config.DataConfig`); None where unfiltered."""
    return filter_labels(data), keep_keys(data.keep)


def filter_labels(data) -> frozenset[int] | None:
    """The class labels `data.filter` keeps in the classification sets of data.train and data.unpaired."""
    if not data.filter:
        return None
    from clipdistill.eval.base2novel import parse_data_filter

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
