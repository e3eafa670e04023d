"""A run's data streams (issue 7; docs/methods.md sections 0 and 7): one `DataStream` per source of a step's data.

- `paired`: data.train, image-caption (or classification) shards, with teacher.cache;
- `unpaired`: data.unpaired, caption-less images beside every batch (mixed batches), with
  teacher.unpaired_cache; the class filter applies to them too;
- `texts`: data.texts, a text corpus whose texts ride along the captions (a pure function of seed,
  step, rank and micro-batch: no loader, no data state).

Each shard stream has its own data position (`DataState`), saved in the checkpoint under its
`checkpoint_key` ("data", "data_unpaired"; both are always written so every checkpoint has the same keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader

from clipdistill.data.augment import AugmentPolicy
from clipdistill.data.filter import data_filter
from clipdistill.data.loader import DataState, StreamConfig, count_samples, make_loader, resolve_shards
from clipdistill.data.teacher_cache import TeacherCache
from clipdistill.errors import UserError
from clipdistill.train.config import TrainConfig
from clipdistill.train.distributed import DistInfo

# the checkpoint's names of the shard streams' data states
CHECKPOINT_KEYS = {"paired": "data", "unpaired": "data_unpaired"}


@dataclass
class DataStream:
    """One stream of a run's data: its shards, teacher cache, kept samples, loader config, position and loader."""

    kind: str  # "paired", "unpaired" or "texts"
    what: str  # the config key that names it (for messages)
    specs: list[str]
    shards: list[Path] = field(default_factory=list)
    cache: TeacherCache | None = None
    labels: frozenset[int] | None = None  # the class filter (data.filter)
    keys: frozenset[str] | None = None  # the keep-list (data.keep; data.train only)
    config: StreamConfig | None = None
    state: DataState | None = None
    loader: DataLoader | None = None
    corpus: list[str] = field(default_factory=list)  # texts: the corpus
    micro: int = 0  # texts: texts per micro-batch

    @property
    def checkpoint_key(self) -> str | None:
        return CHECKPOINT_KEYS.get(self.kind)

    def open(self, resume: bool) -> None:
        """Start the loader (at the restored position when resuming); the texts stream has none."""
        if self.config is not None:
            self.loader = make_loader(self.config, self.cache, self.state if resume else None)


def resolve_streams(cfg: TrainConfig) -> tuple[list[DataStream], bool]:
    """The shard streams (paired, and unpaired with data.unpaired) and whether data.train has captions."""
    data = cfg.data
    shards, kinds = [], []
    for spec in data.train:
        paths, kind = resolve_shards(spec, data.root)
        shards += paths
        kinds.append(kind)
    text = all(k != "classification" for k in kinds)
    cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
    labels, keys = data_filter(data)
    streams = [DataStream("paired", "data.train", list(data.train), shards, cache, labels, keys)]
    unpaired = [p for spec in data.unpaired for p in resolve_shards(spec, data.root)[0]]
    if unpaired:
        cache_u = TeacherCache(cfg.teacher.unpaired_cache) if cfg.teacher.unpaired_cache else None
        # the keep-list names data.train samples; the class filter applies to both
        streams.append(
            DataStream("unpaired", "data.unpaired", list(data.unpaired), unpaired, cache_u, labels)
        )
    return streams, text


def start_states(streams: list[DataStream], n_streams: int) -> dict[str, DataState]:
    """Give every shard stream a fresh data position (`n_streams`: ranks x workers); returns fresh positions
    for the checkpoint keys of the stream kinds the run does not use (a resumed run carries them on)."""
    for s in streams:
        s.state = DataState(streams=n_streams) if s.checkpoint_key else None
    used = {s.checkpoint_key for s in streams}
    return {key: DataState(streams=n_streams) for key in CHECKPOINT_KEYS.values() if key not in used}


def micro_size(size: int, what: str, world: int, accum: int) -> int:
    """One rank's micro-batch of a global batch `size` (refused unless ranks x accum_steps divides it)."""
    if size % (world * accum):
        raise UserError(
            f"{what} {size} is not divisible by ranks x accum_steps = {world} x {accum}; change one"
        )
    return size // (world * accum)


def shard_stream_config(
    stream: DataStream,
    cfg: TrainConfig,
    info: DistInfo,
    *,
    views: dict,
    pooled: bool,
    text: bool = False,
    extras: dict | None = None,
) -> StreamConfig:
    """The loader config of a shard stream (paired: `text` and `extras` from the run; unpaired: images only)."""
    data = cfg.data
    if stream.kind == "paired":
        size, key = data.batch_size, "data.batch_size"
    else:
        size, key = data.unpaired_batch_size or data.batch_size, "data.unpaired_batch_size"
    policy = data.augment or (stream.cache.info.policy if stream.cache is not None else AugmentPolicy())
    return StreamConfig(
        shards=stream.shards,
        batch_size=micro_size(size, key, info.world, cfg.optim.accum_steps),
        views=views,
        policy=policy,
        seed=cfg.seed,
        rank=info.rank,
        world=info.world,
        workers=data.workers,
        shuffle_buffer=data.shuffle_buffer,
        text=text,
        pooled=pooled,
        labels=stream.labels,
        keys=stream.keys,
        extras=extras,
        what=stream.what,
    )


def configure_streams(
    streams: list[DataStream],
    cfg: TrainConfig,
    info: DistInfo,
    *,
    views: dict,
    pooled: bool,
    text: bool,
    extras: dict | None,
) -> None:
    """Give the shard streams their loader configs (views: the student's and an online teacher's image
    configs; pooled: read cached pooled teacher features) and append the texts stream (data.texts)."""
    paired = streams[0]
    paired.config = shard_stream_config(
        paired, cfg, info, views=views, pooled=pooled, text=text, extras=extras
    )
    texts = text_stream(cfg, info, text)
    for s in streams[1:]:  # the unpaired images: no captions, no cache extras
        s.config = shard_stream_config(s, cfg, info, views=views, pooled=pooled)
    if texts is not None:
        streams.append(texts)


def text_stream(cfg: TrainConfig, info: DistInfo, text: bool) -> DataStream | None:
    """The data.texts stream (None without data.texts); it needs captions in data.train."""
    data = cfg.data
    if not data.texts:
        return None
    from clipdistill.data.texts import load_corpora

    if not text:
        raise UserError(
            "data.texts needs image-caption data in data.train (the texts' relations use the batch's images)"
        )
    corpus = load_corpora(data.texts)
    micro = micro_size(
        data.text_batch_size or data.batch_size, "data.text_batch_size", info.world, cfg.optim.accum_steps
    )
    return DataStream("texts", "data.texts", list(data.texts), corpus=corpus, micro=micro)


def check_streams(streams: list[DataStream], cfg: TrainConfig, world: int) -> None:
    """Refuse, before step 0, data that cannot give each of its streams (ranks x workers) one record:
    a stream without records would wait forever."""
    n_streams = world * max(1, cfg.data.workers)
    for s in (s for s in streams if s.kind != "texts"):
        n = count_samples(s.shards, s.labels, s.keys, at_most=n_streams)
        if n == 0 and (s.labels is not None or s.keys is not None):
            raise UserError(
                f"the data filter (filter={cfg.data.filter!r}, keep={cfg.data.keep!r}) keeps no sample of "
                f"{s.what} {s.specs}; check the keep-list's keys and the filter"
            )
        if n == 0:
            raise UserError(
                f"{s.what} {s.specs} holds no readable sample ({len(s.shards)} shard(s), empty or unreadable); "
                "check the shards or choose another split"
            )
        if n < n_streams:
            raise UserError(
                f"{s.what} {s.specs} has {n} sample(s), fewer than its {n_streams} data streams "
                "(ranks x data.workers); lower data.workers or add data"
            )


def plan_steps(paired: DataStream, cfg: TrainConfig) -> tuple[int, int | None]:
    """(total optimiser steps, samples per epoch of data.train or None where unknown and not needed)."""
    if cfg.steps is not None:
        return cfg.steps, dataset_size(paired, cfg) if paired.cache is not None else None
    size = dataset_size(paired, cfg)
    return max(1, math.ceil(cfg.epochs * size / cfg.data.batch_size)), size


def dataset_size(paired: DataStream, cfg: TrainConfig) -> int:
    """Samples in one epoch of data.train (after the data filter)."""
    if paired.labels is not None or paired.keys is not None:
        size = count_samples(paired.shards, paired.labels, paired.keys)
        if size == 0:
            raise UserError(
                f"the data filter (filter={cfg.data.filter!r}, keep={cfg.data.keep!r}) keeps no sample of {cfg.data.train}"
            )
        return size
    if paired.cache is not None:
        from clipdistill.data.loader import shard_name

        names = {shard_name(p) for p in paired.shards}
        return sum(int(s["samples"]) for s in paired.cache.info.shards if s["name"] in names)
    return count_samples(paired.shards)
