"""The training data pipeline: image-caption (or unlabeled classification) shards into micro-batches.

Design (issue 7, docs/methods.md sections 0 and 7):

- Every rank and DataLoader worker is one *stream* (`stream = rank * workers + worker`). In each epoch
  the shard order is permuted with the run seed, the concatenated records are dealt round-robin to the
  streams (sample-level split, so two shards feed four streams evenly), and each stream passes its
  records through a seeded shuffle buffer. Streams are endless (epoch after epoch), so every rank
  always has a next batch and DDP ranks never fall out of step.
- Everything random about a sample (its view, its caption) is a pure function of the run seed, the
  epoch and the sample's identity (`augment.stable_seed`): no generator state to save.
- A stream's position is `(epoch, records emitted)`. Each batch carries its stream id and position;
  the trainer records what it consumed (`DataState`), and a resumed stream replays its epoch from the
  start without decoding anything until that position: exact resume, cheap skip.
- With a teacher cache the view is one of the K stored ones and the teacher embeddings come from the
  cache; samples missing from the cache (skipped while caching) are skipped here too. Undecodable or
  incomplete samples are skipped and counted, never raised.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipdistill.data.augment import AugmentPolicy, replay, sample_params, stable_seed
from clipdistill.data.shards import IMAGE_EXTS, Sample, SkipCounter, dataset_info, decode_image, shard_name
from clipdistill.errors import UserError

if TYPE_CHECKING:
    # models.base names the model interface; data uses it in annotations only, so it is not imported at run
    # time (data sits below models: docs/import_graph.md).
    from clipdistill.models.base import ImageConfig

log = logging.getLogger(__name__)


# --- shards -----------------------------------------------------------------------------------------


def resolve_shards(spec: str, data_root: str | Path | None = None) -> tuple[list[Path], str]:
    """Shards and kind ("retrieval", "classification" or "unknown") of a data spec.

    `name` or `name:split` (a dataset under the data root, split default "train"), a dataset folder
    path with optional `:split`, a shard file, or a glob such as `dir/*.tar`.
    """
    if any(ch in spec for ch in "*?[") or spec.endswith((".tar", ".tar.gz")):
        paths = sorted((Path(p) for p in glob.glob(str(Path(spec).expanduser()))), key=_shard_sort_key)
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise UserError(
                f"no shard matches '{spec}'; pass a dataset name (e.g. flickr8k:train) or an existing shard glob"
            )
        kind_file = paths[0].parent.parent / "dataset_type.txt"
        return paths, kind_file.read_text().strip() if kind_file.exists() else "unknown"
    name, _, split = spec.partition(":")
    split = split or "train"
    folder = Path(name).expanduser()
    if (folder / "dataset_type.txt").exists():
        info = dataset_info(folder.name, folder.parent)
    elif "/" in name:
        raise UserError(
            f"'{name}' is not a dataset folder (no dataset_type.txt); pass e.g. shared/data/flickr8k:train"
        )
    else:
        info = dataset_info(name, data_root)
    return info.shards(split), info.kind


def _shard_sort_key(p: Path) -> tuple:
    stem = p.name.split(".", 1)[0]
    return (str(p.parent), int(stem) if stem.isdigit() else 0, p.name)


def shard_identity(paths: list[Path]) -> list[dict]:
    """Names and sizes of shards, as fingerprints record them."""
    return [{"name": shard_name(p), "bytes": p.stat().st_size} for p in paths]


def _no_split(src):
    return src


def read_raw(shards: list[Path], skipped: SkipCounter, *, warn: bool = True) -> Iterator[dict]:
    """Undecoded webdataset records of `shards` in stored order; unreadable tar data is skipped and counted
    (and logged unless `warn` is False)."""

    def on_error(exn: Exception) -> bool:
        skipped.add("unreadable shard data")
        if warn:
            log.warning("skipping unreadable shard data: %s", exn)
        return True

    # Our own rank/worker split happens above this reader, so webdataset's splitters are turned off.
    yield from wds.WebDataset(
        [str(p) for p in shards],
        shardshuffle=False,
        handler=on_error,
        empty_check=False,
        nodesplitter=_no_split,
        workersplitter=_no_split,
    )


def decode_record(raw: dict, skipped: SkipCounter, *, text: bool = True) -> Sample | None:
    """A `Sample` (every caption, in stored order) or None when the record is skipped (and counted).

    With `text` False captions and labels are ignored (classification shards used unlabeled).
    """
    key = raw.get("__key__", "")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        skipped.add("no image")
        return None
    sample = Sample(key=key, image=None, shard=shard_name(raw.get("__url__", "")))  # type: ignore[arg-type]
    if text:
        if "txt" not in raw:
            skipped.add("no caption")
            return None
        caps = [c.strip() for c in raw["txt"].decode("utf-8", errors="replace").splitlines() if c.strip()]
        if not caps:
            skipped.add("no caption")
            return None
        sample.captions = caps
    try:
        sample.image = decode_image(raw[ext])
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for corrupt data
        skipped.add("undecodable image")
        log.warning("skipping %s: undecodable image (%s)", key, exn)
        return None
    return sample


def count_samples(
    shards: list[Path],
    labels: frozenset[int] | None = None,
    keys: frozenset[str] | None = None,
    *,
    at_most: int | None = None,
) -> int:
    """Number of records (keys) in `shards` that pass the data filter, without decoding images.

    at_most: stop reading once this many are found (a cheap "is there enough data" check).
    """
    n = 0
    for r in read_raw(shards, SkipCounter(), warn=False):  # the training stream warns, once per epoch
        if keep_record(r, labels, keys):
            n += 1
            if at_most is not None and n >= at_most:
                break
    return n


class EmptyStream(UserError):
    """A data stream went through a whole epoch without one usable sample: it would wait forever."""


def worker_error_message(err: Exception) -> str:
    """The one-line message of a UserError, also when a DataLoader worker raised it (the DataLoader
    re-raises it with the worker's traceback folded into the message)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(err)
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.endswith(type(err).__name__) else last


# --- the stream -------------------------------------------------------------------------------------


@dataclass
class StreamConfig:
    """What one rank's stream needs. `batch_size` is the micro-batch of one stream; `views` maps a view
    name ("student", and "teacher" for an online teacher) to the model's image config."""

    shards: list[Path]
    batch_size: int
    views: dict[str, ImageConfig]
    policy: AugmentPolicy = field(default_factory=AugmentPolicy)
    seed: int = 0
    rank: int = 0
    world: int = 1
    workers: int = 0
    shuffle_buffer: int = 1000
    text: bool = True
    pooled: bool = False  # read the cached pre-projection teacher features too
    labels: frozenset[int] | None = (
        None  # classification records: keep only these classes (labels never reach the loss)
    )
    keys: frozenset[str] | None = None  # keep only these sample keys (a curation keep-list)
    extras: dict[str, str] | None = None  # per-caption cache extras to read: Outputs.extra name -> array name
    what: str = "data.train"  # the config key these shards come from (for messages)


def keep_record(raw: dict, labels: frozenset[int] | None, keys: frozenset[str] | None) -> bool:
    """The data filter, applied to undecoded records before shuffling (cheap: no image decoding).

    `labels` applies to records that carry a class label (`cls`); records without one (image-caption
    data in a mixed set) pass. `keys` applies to every record.
    """
    if keys is not None and raw.get("__key__") not in keys:
        return False
    if labels is not None and "cls" in raw:
        try:
            return (
                int(raw["cls"].decode("utf-8").strip() if isinstance(raw["cls"], bytes) else raw["cls"])
                in labels
            )
        except ValueError:
            return False  # an unreadable label cannot be shown to be in the kept set
    return True


class TrainStream(IterableDataset):
    """Endless micro-batches for one rank (see module docstring). `start` maps stream id to
    `(epoch, records emitted)`; `offset` rotates worker ids so a resumed DataLoader, which always
    asks worker 0 first, continues the round-robin where the interrupted one stopped."""

    def __init__(
        self, cfg: StreamConfig, cache=None, start: dict[int, tuple[int, int]] | None = None, offset: int = 0
    ):
        super().__init__()
        self.cfg = cfg
        self.cache = cache
        self.start = dict(start or {})
        self.offset = offset
        self.num_workers = max(1, cfg.workers)

    def _epoch_records(self, epoch: int, stream: int, skipped: SkipCounter) -> Iterator[tuple[int, dict]]:
        cfg = self.cfg
        order = np.random.default_rng(stable_seed(cfg.seed, "shards", epoch)).permutation(len(cfg.shards))
        total = cfg.world * self.num_workers
        records = read_raw([cfg.shards[i] for i in order], skipped)
        if cfg.labels is not None or cfg.keys is not None:
            records = (r for r in records if keep_record(r, cfg.labels, cfg.keys))
        mine = (r for i, r in enumerate(records) if i % total == stream)
        rng = np.random.default_rng(stable_seed(cfg.seed, "buffer", epoch, stream))
        buf: list[dict] = []
        emitted = 0
        for rec in mine:
            if len(buf) < cfg.shuffle_buffer:
                buf.append(rec)
                continue
            j = int(rng.integers(len(buf)))
            yield emitted, buf[j]
            emitted += 1
            buf[j] = rec
        for j in rng.permutation(len(buf)):
            yield emitted, buf[j]
            emitted += 1

    def _example(self, raw: dict, epoch: int, skipped: SkipCounter) -> dict | None:
        cfg = self.cfg
        sample = decode_record(raw, skipped, text=cfg.text)
        if sample is None:
            return None
        rng = np.random.default_rng(stable_seed(cfg.seed, "sample", epoch, sample.shard, sample.key))
        out: dict = {"key": sample.key}
        if self.cache is not None:
            hit = self.cache.lookup(sample.shard, sample.key)
            if hit is None:
                skipped.add("not in teacher cache")
                return None
            shard, row = hit
            view = int(rng.integers(shard.augmentations))
            params = shard.aug[row, view]
            out["teacher_image"] = torch.from_numpy(np.array(shard.image[row, view], dtype=np.float32))
            if cfg.pooled:
                out["teacher_pooled"] = torch.from_numpy(np.array(shard.pooled[row, view], dtype=np.float32))
        else:
            params = sample_params(cfg.policy, sample.image.width, sample.image.height, 1, rng, first=False)[
                0
            ]
        if cfg.text:
            c = int(rng.integers(len(sample.captions)))
            out["caption"] = sample.captions[c]
            if self.cache is not None:
                j = shard.text_index(row, c)
                out["teacher_text"] = torch.from_numpy(np.array(shard.text[j], dtype=np.float32))
                if cfg.extras:
                    out["teacher_extra"] = {
                        k: torch.from_numpy(np.array(shard.extra(v)[j], dtype=np.float32))
                        for k, v in cfg.extras.items()
                    }
        try:
            out["views"] = {name: replay(sample.image, params, icfg) for name, icfg in cfg.views.items()}
        except ValueError as exn:  # a cached crop box that does not fit this image: the data changed
            skipped.add("augmentation does not fit image")
            log.warning("skipping %s: %s", sample.key, exn)
            return None
        out["aug"] = torch.from_numpy(np.array(params, dtype=np.float32))
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.offset) % self.num_workers
        stream = self.cfg.rank * self.num_workers + worker
        epoch, position = self.start.get(stream, (0, 0))
        # One counter for the stream's lifetime, emptied in place after each batch: the shard reader
        # of an epoch holds on to it, so its read errors land in the next batch's count.
        skipped = SkipCounter()
        items: list[dict] = []
        while True:
            usable = 0
            for idx, raw in self._epoch_records(epoch, stream, skipped):
                if idx < position:
                    continue
                if idx == position and position:
                    skipped.reasons = {}  # counted before the checkpoint
                item = self._example(raw, epoch, skipped)
                if item is not None:
                    items.append(item)
                    usable += 1
                if len(items) == self.cfg.batch_size:
                    yield collate(items, stream=stream, pos=(epoch, idx + 1), skipped=skipped.reasons)
                    items, skipped.reasons = [], {}
            if not usable and not position:  # a whole epoch gave nothing: so will every later one
                lost = (
                    ", ".join(f"{n} {why}" for why, n in skipped.reasons.items())
                    or "no record reached this stream"
                )
                raise EmptyStream(
                    f"{self.cfg.what} gives data stream {stream} no usable sample in a whole epoch of "
                    f"{len(self.cfg.shards)} shard(s) ({lost}); check the shards, the keep-list and the data filter"
                )
            epoch, position = epoch + 1, 0


def collate(items: list[dict], *, stream: int, pos: tuple[int, int], skipped: dict[str, int]) -> dict:
    views = {name: torch.stack([it["views"][name] for it in items]) for name in items[0]["views"]}
    batch: dict = {
        "views": views,
        "keys": [it["key"] for it in items],
        "captions": [it["caption"] for it in items] if "caption" in items[0] else None,
        "aug": torch.stack([it["aug"] for it in items]),
        "stream": stream,
        "pos": pos,
        "skipped": dict(skipped),
    }
    for name in ("teacher_image", "teacher_text", "teacher_pooled"):
        if name in items[0]:
            batch[name] = torch.stack([it[name] for it in items])
    if "teacher_extra" in items[0]:
        batch["teacher_extra"] = {
            k: torch.stack([it["teacher_extra"][k] for it in items]) for k in items[0]["teacher_extra"]
        }
    return batch


# --- position bookkeeping in the trainer ------------------------------------------------------------


@dataclass
class DataState:
    """What the trainer consumed: per-stream positions, batch and sample counts, skipped samples."""

    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)
    streams: int = 1  # world x workers when recorded; a different layout cannot resume exactly

    def update(self, batch: dict) -> None:
        self.positions[int(batch["stream"])] = tuple(batch["pos"])
        self.batches += 1
        self.samples += len(batch["keys"])
        for reason, n in batch["skipped"].items():
            self.skipped.reasons[reason] = self.skipped.reasons.get(reason, 0) + n

    def state_dict(self) -> dict:
        return {
            "positions": {int(k): list(v) for k, v in self.positions.items()},
            "batches": self.batches,
            "samples": self.samples,
            "skipped": dict(self.skipped.reasons),
            "streams": self.streams,
        }

    @classmethod
    def from_state(cls, state: dict) -> DataState:
        return cls(
            positions={int(k): tuple(v) for k, v in state["positions"].items()},
            batches=int(state["batches"]),
            samples=int(state["samples"]),
            skipped=SkipCounter(dict(state["skipped"])),
            streams=int(state.get("streams", 1)),
        )


def make_loader(cfg: StreamConfig, cache=None, state: DataState | None = None) -> DataLoader:
    """A DataLoader over this rank's `TrainStream`, resumed from `state` when given.

    `state.positions` may hold every rank's streams (merged in the checkpoint); each stream takes its own.
    A checkpoint from a different ranks x workers layout restarts the streams at their current epoch.
    """
    streams = cfg.world * max(1, cfg.workers)
    start, offset = {}, 0
    if state is not None:
        if state.streams == streams:
            start, offset = dict(state.positions), state.batches % max(1, cfg.workers)
        else:
            epoch = min((e for e, _ in state.positions.values()), default=0)
            log.warning(
                "checkpoint data position was recorded with %d streams, now %d: restarting the data at epoch %d "
                "(resume is exact only with the same ranks x workers)",
                state.streams,
                streams,
                epoch,
            )
            start = {s: (epoch, 0) for s in range(streams)}
    stream = TrainStream(cfg, cache, start, offset)
    kwargs = {"prefetch_factor": 2, "persistent_workers": False} if cfg.workers > 0 else {}
    return DataLoader(stream, batch_size=None, num_workers=cfg.workers, **kwargs)
