"""Webdataset readers for the CLIP_benchmark `wds_*` layout (plain `.tar` and gzip `.tar.gz` shards).

A dataset folder holds `dataset_type.txt` ("classification" or "retrieval"), for classification
`classnames.txt` and `zeroshot_classification_templates.txt`, and per split `nshards.txt` plus
shards `0.tar` / `0.tar.gz` ... Each sample has an image member (`jpg`, `jpeg`, `png` or `webp`)
and either `cls` (integer label) or `txt` (captions, one per line).

Undecodable or incomplete samples are skipped and counted in `SkipCounter`, never raised.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image

from clipdistill.errors import UserError, unknown_name
from clipdistill.paths import data_root

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    """One decoded sample. `label` for classification, `captions` for image-caption data."""

    key: str
    image: Image.Image
    label: int | None = None
    captions: list[str] | None = None
    shard: str = ""


@dataclass
class SkipCounter:
    """Samples skipped while reading, by reason (e.g. 'undecodable image', 'no caption')."""

    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


@dataclass
class DatasetInfo:
    """A dataset folder in the CLIP_benchmark layout."""

    name: str
    root: Path
    kind: str  # "classification" | "retrieval"
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    def splits(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _split_shards(p))

    def shards(self, split: str) -> list[Path]:
        split_dir = self.root / split
        shards = _split_shards(split_dir) if split_dir.is_dir() else []
        if not shards:
            raise UserError(
                f"dataset '{self.name}' has no split '{split}'; available splits: {', '.join(self.splits()) or 'none'}"
            )
        return shards


def _split_shards(split_dir: Path) -> list[Path]:
    """Shards of a split in numeric order; `nshards.txt` is the authority when present."""
    found = {}
    for p in split_dir.iterdir():
        stem = p.name.split(".", 1)[0]
        if stem.isdigit() and (p.name.endswith(".tar") or p.name.endswith(".tar.gz")):
            found[int(stem)] = p
    n_file = split_dir / "nshards.txt"
    if n_file.exists():
        text = n_file.read_text(encoding="utf-8", errors="replace").strip()
        if not text.isdigit():
            raise UserError(f"'{n_file}' holds {text[:40]!r}, not a shard count; write the number of shards of the split in it")
        n = int(text)
        missing = [i for i in range(n) if i not in found]
        if missing:
            raise UserError(f"split '{split_dir}' lists {n} shards but shard {missing[0]} is missing; re-copy the dataset")
        return [found[i] for i in range(n)]
    return [found[i] for i in sorted(found)]


def list_datasets(root: str | Path | None = None) -> list[str]:
    base = data_root(root)
    return sorted(p.name for p in base.iterdir() if (p / "dataset_type.txt").exists())


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """Describe dataset `name` under the data root (see `clipdistill.paths.data_root`)."""
    base = data_root(root)
    folder = base / name
    if not (folder / "dataset_type.txt").exists():
        if folder.is_dir():
            raise UserError(f"'{folder}' has no dataset_type.txt; it is not a CLIP_benchmark-style dataset folder")
        raise unknown_name("dataset", name, list_datasets(base))
    kind = (folder / "dataset_type.txt").read_text().strip()
    info = DatasetInfo(name=name, root=folder, kind=kind)
    if kind not in ("classification", "retrieval"):
        raise UserError(f"'{folder / 'dataset_type.txt'}' says {kind[:40]!r}; write classification or retrieval in it")
    if kind == "classification":
        info.classnames = _lines(folder / "classnames.txt")
        info.templates = _lines(folder / "zeroshot_classification_templates.txt")
    return info


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise UserError(f"missing '{path}'; a classification dataset needs classnames.txt and templates")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"'{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if not lines:
        raise UserError(f"'{path}' is empty; a classification dataset needs one line per class (classnames) or template")
    return lines


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB, forcing a full decode so truncated files fail here."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def _raw_samples(shards: Iterable[Path], skipped: SkipCounter) -> Iterator[dict]:
    def on_error(exn: Exception) -> bool:
        skipped.add("unreadable shard data")
        log.warning("skipping unreadable shard data: %s", exn)
        return True

    urls = [str(p) for p in shards]
    # Read exactly the shards given: callers split shards across ranks and workers themselves, and
    # evaluation on rank 0 of a DDP run must see the whole split.
    yield from wds.WebDataset(
        urls, shardshuffle=False, handler=on_error, empty_check=False, nodesplitter=_all, workersplitter=_all
    )


def _all(urls):
    return urls


def iter_samples(
    shards: Iterable[str | Path],
    *,
    skipped: SkipCounter | None = None,
    keys: set[str] | None = None,
    labels: set[int] | None = None,
    caption: str = "all",
    rng: random.Random | None = None,
) -> Iterator[Sample]:
    """Decoded samples of `shards` in stored order.

    keys: keep only these sample keys (a curation keep-list). labels: keep only these classes.
    caption: "all" keeps every caption, "random" one random caption per sample (training).
    Corrupt images, missing captions or labels are skipped and counted in `skipped`.
    """
    skipped = skipped if skipped is not None else SkipCounter()
    rng = rng or random.Random(0)
    for raw in _raw_samples([Path(s) for s in shards], skipped):
        key = raw.get("__key__", "")
        if keys is not None and key not in keys:
            continue
        img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is None:
            skipped.add("no image")
            continue
        sample = Sample(key=key, image=None, shard=str(raw.get("__url__", "")))  # type: ignore[arg-type]
        if "cls" in raw:
            try:
                sample.label = int(raw["cls"].decode().strip())
            except ValueError:
                skipped.add("bad label")
                continue
            if labels is not None and sample.label not in labels:
                continue
        elif "txt" in raw:
            caps = [c.strip() for c in raw["txt"].decode("utf-8", errors="replace").splitlines() if c.strip()]
            if not caps:
                skipped.add("no caption")
                continue
            sample.captions = [rng.choice(caps)] if caption == "random" else caps
        else:
            skipped.add("no label or caption")
            continue
        try:
            sample.image = decode_image(raw[img_ext])
        except Exception as exn:  # PIL raises many types for corrupt data
            skipped.add("undecodable image")
            log.warning("skipping %s: undecodable image (%s)", key, exn)
            continue
        yield sample


def subsample(samples: Iterable[Sample], every: int) -> Iterator[Sample]:
    """Every `every`-th sample (deterministic), for quick evaluation of large test sets."""
    for i, s in enumerate(samples):
        if i % every == 0:
            yield s


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
