"""Run one evaluation task of a model on one dataset split and return a CLIP_benchmark-style record
(docs/methods.md section 10):

    {"dataset": ..., "model": ..., "pretrained": ..., "task": ..., "metrics": {...},
     "clipdistill": {"seconds": ..., "samples": ..., "skipped": ..., "split": ..., "every": ..., ...}}

Tasks: `zeroshot_classification`, `zeroshot_retrieval`, `base2novel`, `linear_probe`; the default
follows the dataset's `dataset_type.txt`. `every=N` evaluates every N-th sample only (recorded).

Class embeddings and linear-probe features are cached for models that name themselves
(eval/embedding_cache.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from torch import Tensor

from clipdistill import __version__
from clipdistill.checks import check_output_file
from clipdistill.data.shards import DatasetInfo, Sample, SkipCounter, dataset_info, iter_samples, subsample
from clipdistill.errors import UserError, unknown_name
from clipdistill.eval import base2novel as b2n
from clipdistill.eval.embedding_cache import (
    cache_file,
    cached_class_embeddings,
    image_probe,
    load_entry,
    model_identity,
    save_entry,
    shards_state,
)
from clipdistill.eval.linear_probe import ProbeConfig, linear_probe
from clipdistill.eval.retrieval import zeroshot_retrieval
from clipdistill.eval.zeroshot import (
    encode_labelled_images,
    evaluating,
    zeroshot_classification,
)
from clipdistill.models.base import ClipModel
from clipdistill.models.factory import parse_spec
from clipdistill.paths import atomic_path

log = logging.getLogger(__name__)

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "base2novel", "linear_probe")
_KIND = {
    "zeroshot_classification": "classification",
    "zeroshot_retrieval": "retrieval",
    "base2novel": "classification",
    "linear_probe": "classification",
}


# ---------------------------------------------------------------- names


def resolve_task(task: str | None, info: DatasetInfo) -> str:
    """`task`, or the default for the dataset's kind; checked against the dataset's kind."""
    if task is None:
        task = "zeroshot_retrieval" if info.kind == "retrieval" else "zeroshot_classification"
    if task not in TASKS:
        raise unknown_name("task", task, TASKS)
    if _KIND[task] != info.kind:
        raise UserError(
            f"task {task} needs a {_KIND[task]} dataset but '{info.name}' is {info.kind}; pick another --task or --dataset"
        )
    return task


def split_spec(spec: str) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark names them, from a model spec string.

    'openclip:ViT-B-32/laion2b' -> ('openclip:ViT-B-32', 'laion2b'); 'student:x@/ck.pt' -> ('student:x',
    '/ck.pt'); 'teacher:DIR' -> ('teacher', 'DIR'); 'hf:ID' -> ('hf', 'ID'); 'openclip:/DIR' ->
    ('openclip', '/DIR'); 'ensemble:A+B' -> ('ensemble', 'A+B'); no weights (or not a spec) -> 'random'.
    """
    try:
        parsed = parse_spec(spec)
    except UserError:  # a `spec` attribute set by hand: the model as named
        return spec, "random"
    if parsed.kind == "ensemble":  # the members name their own weights
        return parsed.kind, parsed.rest
    weights = parsed.checkpoint if parsed.checkpoint is not None else parsed.tag
    if weights is not None:
        return f"{parsed.kind}:{parsed.name}", weights
    if parsed.is_folder:
        return parsed.kind, parsed.name
    return spec, "random"


def cached_image_features(
    model: ClipModel,
    info: DatasetInfo,
    split: str,
    *,
    every: int = 1,
    batch_size: int = 64,
    cache: bool = True,
    progress: bool = False,
) -> tuple[Tensor, Tensor, dict[str, int]]:
    """(normalised image embeddings, labels, skipped reasons) of a classification split, from / to
    `cache_dir()/image_features` when the model names itself (the linear probe's features)."""
    shards = info.shards(split)
    identity = model_identity(model) if cache else None
    if identity is not None:
        meta = {"identity": identity, "dataset": shards_state(shards), "every": every}
        path = cache_file("image_features", identity, info.name, split, meta)
        probe = image_probe(model)
        entry = load_entry(path, probe, meta)
        if entry is not None:
            log.info("%s %s features from cache %s", info.name, split, path)
            return entry["features"], entry["labels"], dict(entry["skipped"])
    skipped = SkipCounter()
    samples = _samples(shards, every, skipped, info, split)
    feats, labels = encode_labelled_images(
        model, samples, batch_size=batch_size, progress=progress, total=expected_samples(info, split, every)
    )
    if identity is not None:
        save_entry(
            path,
            {"meta": meta, "probe": probe, "features": feats, "labels": labels, "skipped": skipped.reasons},
        )
    return feats, labels, dict(skipped.reasons)


# ---------------------------------------------------------------- running


class _Counted:
    """An iterable that counts what passes through it."""

    def __init__(self, items: Iterable[Sample]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Sample]:
        for item in self.items:
            self.count += 1
            yield item


def _samples(
    shards: Sequence[Path], every: int, skipped: SkipCounter, info: DatasetInfo | None = None, split: str = ""
) -> Iterator[Sample]:
    samples = iter_samples(shards, skipped=skipped)
    if info is not None and info.kind == "classification":
        samples = _known_labels(samples, info, split)
    return subsample(samples, every) if every > 1 else samples


def _known_labels(samples: Iterable[Sample], info: DatasetInfo, split: str) -> Iterator[Sample]:
    """`samples`, refusing (one line) a label that names no class of classnames.txt: scoring it would
    count it wrong against a class list it is not in, or index past the class list."""
    n = len(info.classnames)
    for s in samples:
        if s.label is not None and not 0 <= s.label < n:
            shard = Path(s.shard).name if s.shard else "?"
            raise UserError(
                f"sample '{s.key}' (shard {shard}) of {info.name}:{split} has label {s.label}, but classnames.txt names "
                f"{n} classes (labels 0..{n - 1}); fix the shard's .cls or {info.root / 'classnames.txt'}"
            )
        yield s


def expected_samples(info: DatasetInfo, split: str, every: int = 1) -> int | None:
    """Sample count from the data root's MANIFEST.json when it has one (for progress bars only)."""
    manifest = info.root.parent / "MANIFEST.json"
    try:
        n = int(json.loads(manifest.read_text())[info.name][split]["num_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return math.ceil(n / every)


def evaluate(
    model: ClipModel | str,
    dataset: str,
    split: str = "test",
    task: str | None = None,
    *,
    data_root: str | Path | None = None,
    every: int = 1,
    batch_size: int = 64,
    split_seed: int | None = None,
    train_split: str = "train",
    train_every: int | None = None,
    probe_config: ProbeConfig | None = None,
    cache: bool = True,
    progress: bool = True,
    output: str | Path | None = None,
) -> dict:
    """Evaluate `model` (a `ClipModel`, or a spec for `create_model`) on `dataset`'s `split`.

    The dataset, split and task are checked before a spec is built, so bad input fails fast.
    task: see `TASKS`; default from `dataset_type.txt`. every: every N-th sample of the split.
    split_seed: base2novel's random class split (default: first half = base). train_split, train_every:
    the linear probe's training split and its subsampling (default `every`). output: also write the
    record there (atomically).
    """
    if output is not None:
        check_output_file(output)
    info = dataset_info(dataset, data_root)
    task = resolve_task(task, info)
    if every < 1 or (train_every is not None and train_every < 1):
        raise UserError(f"--every must be a positive integer, got {every if every < 1 else train_every}")
    shards = info.shards(split)
    if task == "linear_probe":
        info.shards(train_split)
    if isinstance(model, str):
        from clipdistill.models import create_model

        model = create_model(model)
    spec = getattr(model, "spec", None)
    name, pretrained = split_spec(spec) if spec else (getattr(model, "name", type(model).__name__), "")
    start = time.perf_counter()
    skipped = SkipCounter()
    extra: dict = {}
    total = expected_samples(info, split, every)
    with evaluating(model):
        if task == "linear_probe":
            metrics, n, skipped.reasons = _run_linear_probe(
                model,
                info,
                split,
                train_split,
                every,
                train_every,
                batch_size,
                cache,
                progress,
                probe_config,
                extra,
            )
        else:
            samples = _Counted(_samples(shards, every, skipped, info, split))
            metrics = _run_zeroshot(
                task, model, info, samples, batch_size, split_seed, cache, progress, total, extra
            )
            n = samples.count
    record = {
        "dataset": info.name,
        "model": name,
        "pretrained": pretrained,
        "task": task,
        "metrics": metrics,
        "clipdistill": {
            "spec": spec,
            "split": split,
            "every": every,
            **({"subsample": f"1 in {every} samples of the split (every {every}-th)"} if every > 1 else {}),
            "seconds": round(time.perf_counter() - start, 3),
            "samples": n,
            "skipped": skipped.total,
            "skipped_reasons": dict(skipped.reasons),
            **({"unreadable": list(skipped.unreadable)} if skipped.unreadable else {}),
            "version": __version__,
            **extra,
        },
    }
    log.info("%s %s %s: %s", name, info.name, task, {k: round(v, 4) for k, v in metrics.items()})
    if output is not None:
        write_record(record, output)
    return record


def _run_zeroshot(
    task: str,
    model: ClipModel,
    info: DatasetInfo,
    samples: Iterable[Sample],
    batch_size: int,
    split_seed: int | None,
    cache: bool,
    progress: bool,
    total: int | None,
    extra: dict,
) -> dict:
    if task == "zeroshot_retrieval":
        return zeroshot_retrieval(model, samples, batch_size=batch_size, progress=progress, total=total)
    class_emb = cached_class_embeddings(
        model, info.classnames, info.templates, cache=cache, progress=progress
    )
    if task == "zeroshot_classification":
        return zeroshot_classification(
            model,
            samples,
            info.classnames,
            info.templates,
            batch_size=batch_size,
            class_emb=class_emb,
            progress=progress,
            total=total,
        )
    base, novel = b2n.split_classes(len(info.classnames), split_seed)
    extra.update(
        split_seed=split_seed,
        base_classes=[info.classnames[i] for i in base],
        novel_classes=[info.classnames[i] for i in novel],
    )
    return b2n.base2novel(
        model,
        samples,
        info.classnames,
        info.templates,
        seed=split_seed,
        batch_size=batch_size,
        class_emb=class_emb,
        progress=progress,
        total=total,
    )


def _run_linear_probe(
    model: ClipModel,
    info: DatasetInfo,
    split: str,
    train_split: str,
    every: int,
    train_every: int | None,
    batch_size: int,
    cache: bool,
    progress: bool,
    config: ProbeConfig | None,
    extra: dict,
) -> tuple[dict, int, dict[str, int]]:
    train_every = every if train_every is None else train_every
    xtr, ytr, skipped_tr = cached_image_features(
        model, info, train_split, every=train_every, batch_size=batch_size, cache=cache, progress=progress
    )
    xte, yte, skipped_te = cached_image_features(
        model, info, split, every=every, batch_size=batch_size, cache=cache, progress=progress
    )
    result = linear_probe(xtr, ytr, xte, yte, n_classes=len(info.classnames), config=config or ProbeConfig())
    extra.update(
        train_split=train_split,
        train_every=train_every,
        train_skipped=sum(skipped_tr.values()),
        probe=result.extras(),
    )
    return result.metrics, result.n_test, skipped_te


# ---------------------------------------------------------------- records on disk


def write_record(record: dict, path: str | Path) -> Path:
    """Write `record` as JSON to `path` (atomically; parent folders created)."""
    path = check_output_file(path, "record file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Records from JSON files written by `evaluate` (or CLIP_benchmark); a list in a file is flattened."""
    records = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(
                f"result file '{p}' not found; pass JSON files written by `clipdistill eval --output`"
            )
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            raise UserError(
                f"cannot read result file '{p}' ({err}); re-run `clipdistill eval --output {p}`"
            ) from err
        for rec in data if isinstance(data, list) else [data]:
            if not isinstance(rec, dict) or not {"dataset", "model", "metrics"} <= rec.keys():
                raise UserError(
                    f"'{p}' is not an evaluation record (needs dataset, model, metrics); pass `clipdistill eval` output"
                )
            records.append(rec)
    return records
