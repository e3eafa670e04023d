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
LOST_IN_SHARD = "lost in unreadable shard"  # the SkipCounter reason of samples a shard read error lost


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
    """Samples skipped while reading, by reason (e.g. 'undecodable image', 'no caption').

    `unreadable` holds one line per shard that could not be read to its end ("shard ... unreadable
    after sample K ..."): its lost samples are counted under LOST_IN_SHARD where they can be known.
    """

    reasons: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.reasons[reason] = self.reasons.get(reason, 0) + n

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
            raise UserError(
                f"'{n_file}' holds {text[:40]!r}, not a shard count; write the number of shards of the split in it"
            )
        n = int(text)
        missing = [i for i in range(n) if i not in found]
        if missing:
            raise UserError(
                f"split '{split_dir}' lists {n} shards but shard {missing[0]} is missing; re-copy the dataset"
            )
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
            raise UserError(
                f"'{folder}' has no dataset_type.txt; it is not a CLIP_benchmark-style dataset folder"
            )
        raise unknown_name("dataset", name, list_datasets(base))
    kind = (folder / "dataset_type.txt").read_text().strip()
    info = DatasetInfo(name=name, root=folder, kind=kind)
    if kind not in ("classification", "retrieval"):
        raise UserError(
            f"'{folder / 'dataset_type.txt'}' says {kind[:40]!r}; write classification or retrieval in it"
        )
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
        raise UserError(
            f"'{path}' is empty; a classification dataset needs one line per class (classnames) or template"
        )
    return lines


def shard_name(path: str | Path) -> str:
    """A shard's identity independent of where the data root lives: `dataset/split/file`."""
    p = Path(str(path).removeprefix("file:"))
    return "/".join(p.parts[-3:])


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB, forcing a full decode so truncated files fail here."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def read_records(shards: Iterable[Path], skipped: SkipCounter) -> Iterator[dict]:
    """Undecoded webdataset records of `shards` in stored order, one shard after the other.

    A shard that cannot be read to its end (truncated, corrupt, empty file) is counted in samples, not
    error events: the samples it lost are added to `skipped` under LOST_IN_SHARD, from the shard's
    index (`shard_size`) when there is one, else from the tar headers that could be read, and one line
    "shard NAME unreadable after sample K ..." is added to `skipped.unreadable` (and logged once).
    """
    for path in shards:
        errors: list[Exception] = []

        def on_error(exn: Exception, errors=errors) -> bool:
            errors.append(exn)
            return True

        # Read exactly the shards given: callers split shards across ranks and workers themselves, and
        # evaluation on rank 0 of a DDP run must see the whole split.
        read: set[str] = set()
        n = 0
        for raw in wds.WebDataset(
            [str(path)],
            shardshuffle=False,
            handler=on_error,
            empty_check=False,
            nodesplitter=_all,
            workersplitter=_all,
        ):
            read.add(raw.get("__key__", ""))
            n += 1
            yield raw
        if not errors and not _ends_cleanly(Path(path)):
            # Python's tarfile takes a header cut short for the end of the archive: no error is raised
            errors.append(EOFError("the tar ends without its end-of-archive blocks (truncated)"))
        if errors:
            note = _lost_in_shard(Path(path), n, read, skipped)
            log.warning("%s (%s)", note, _one_line(errors[0]))


def _ends_cleanly(path: Path) -> bool:
    """Whether a plain `.tar` shard ends with the two zero blocks every tar writer puts after the last
    member (a gzip shard's truncation is an error of its own)."""
    if not path.name.endswith(".tar"):
        return True
    try:
        size = path.stat().st_size
        if size % 512:
            return False
        with path.open("rb") as f:
            f.seek(max(0, size - 1024))
            return f.read(1024) == bytes(1024)
    except OSError:
        return True  # the reader reports an unreadable file


def _lost_in_shard(path: Path, n: int, read: set[str], skipped: SkipCounter) -> str:
    """Count what an unreadable shard lost (see `read_records`) and return its one-line note."""
    note = f"shard {shard_name(path)} unreadable after sample {n}"
    total = shard_size(path)
    if total is not None and total >= n:
        skipped.add(LOST_IN_SHARD, total - n)
        note += f": {total - n} of its {total} samples lost"
    else:
        seen = _keys_in_headers(path) - read
        skipped.add(LOST_IN_SHARD, len(seen))
        note += f": {len(seen)} more sample(s) named in its readable tar headers lost, " if seen else ": "
        note += "the rest of the shard is unknown (no shard index gives its sample count)"
    skipped.unreadable.append(note)
    return note


def _one_line(exn: Exception) -> str:
    return " ".join(str(exn.args[0] if exn.args else exn).split())[:200]


def _keys_in_headers(path: Path) -> set[str]:
    """Sample keys named by the tar headers of `path` that can be read (a truncated shard's prefix)."""
    import tarfile

    keys: set[str] = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                base, _, ext = member.name.rpartition("/")[2].partition(".")
                if member.isreg() and ext and not base.startswith("__"):
                    keys.add(member.name[: len(member.name) - len(ext) - 1])
    except Exception:  # noqa: BLE001 - a broken shard raises many types; what was read is the answer
        pass
    return keys


def _all(urls):
    return urls


def shard_size(path: Path) -> int | None:
    """A shard's sample count from an index, or None: the split folder's `sizes.json` (open_clip's
    `{"0.tar": 16}`), or the data root's MANIFEST.json for a one-shard split."""
    import json

    try:
        sizes = json.loads((path.parent / "sizes.json").read_text())
        return int(sizes[path.name])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        entry = json.loads((path.parent.parent.parent / "MANIFEST.json").read_text())[
            path.parent.parent.name
        ][path.parent.name]
        return int(entry["num_samples"]) if int(entry["num_shards"]) == 1 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    for raw in read_records([Path(s) for s in shards], skipped):
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
