"""Checking a webdataset split against its `nshards.txt`, and carving Flickr8k's missing `dev` split.

A split folder is complete when it holds exactly shards `0.tar` ... `N-1.tar` (or `.tar.gz`) for the
`N` in its `nshards.txt` (`verify_split`; `data get` refuses to install anything else, and
`is_complete` is how `data get`/`require` tell a local split from a missing one). Flickr8k's Hub
copy has no `dev` split, which the toolkit uses only to choose options (early stopping of the
teacher build): when `dev` is asked for and the Hub lacks it, `carve_dev_split` takes a seeded
random `dev_size` samples out of `train` (the installed `train` no longer holds them, so the two stay
disjoint) and records the draw in `dev_split.json`.
"""

from __future__ import annotations

import json
import random
import re
import tarfile
from pathlib import Path

from clipdistill.errors import UserError

DEV_SEED = 0
_SHARD = re.compile(r"^(\d+)\.tar(\.gz)?$")
# webdataset's rule: the key is the member path up to the first dot of its file name.
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.")


def shard_files(split_dir: Path) -> dict[int, Path]:
    """Shard index -> file (`N.tar` or `N.tar.gz`) in a split folder."""
    found = {}
    for p in split_dir.iterdir() if split_dir.is_dir() else []:
        m = _SHARD.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def verify_split(split_dir: Path, label: str = "") -> int:
    """The shard count of a split; UserError unless it holds exactly shards 0..N-1 of its nshards.txt."""
    where = f"{label} split '{split_dir.name}'" if label else f"split '{split_dir}'"
    n_file = split_dir / "nshards.txt"
    if not n_file.exists():
        raise UserError(
            f"{where} has no nshards.txt; it is not a CLIP_benchmark webdataset split, nothing installed"
        )
    text = n_file.read_text(errors="replace").strip()
    if not text.isdigit():
        raise UserError(f"{where}: nshards.txt holds {text[:40]!r}, not a shard count; nothing installed")
    n = int(text)
    found = shard_files(split_dir)
    if sorted(found) != list(range(n)):
        raise UserError(
            f"{where}: nshards.txt says {n} shards but shards {_ranges(sorted(found))} are present; "
            "the copy is incomplete or inconsistent, nothing installed"
        )
    return n


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    return f"{ids[0]}..{ids[-1]} ({len(ids)} files)" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids)


def is_complete(split_dir: Path) -> bool:
    if not split_dir.is_dir():
        return False
    try:
        verify_split(split_dir)
    except UserError:
        return False
    return True


def sample_keys(shard: Path) -> list[str]:
    """Sample keys of a shard in stored order, from member names only (a plain tar is not read through)."""
    keys: dict[str, None] = {}
    with tarfile.open(shard, "r:*") as tar:
        for name in tar.getnames():
            m = _KEY.match(name)
            if m:
                keys[m.group(1)] = None
    return list(keys)


def count_samples(split_dir: Path) -> int:
    return sum(len(sample_keys(p)) for _, p in sorted(shard_files(split_dir).items()))


def carve_dev_split(train_dir: Path, out: Path, size: int, seed: int = DEV_SEED) -> dict:
    """Write `out/dev` (a seeded draw of `size` samples of `train_dir`, at most half) and `out/train`
    (the rest).

    Shards keep their compression and the samples their stored order; `out/train` has as many shards
    as `train_dir`, `out/dev` one. The draw is recorded in `out/dev_split.json`.
    """
    shards = [p for _, p in sorted(shard_files(train_dir).items())]
    keys = [k for p in shards for k in sample_keys(p)]
    size = min(size, len(keys) // 2)
    if size < 1:
        raise UserError(
            f"cannot carve a dev split out of {len(keys)} train samples; pass --splits without dev"
        )
    dev_keys = set(random.Random(seed).sample(keys, size))
    suffix = ".tar.gz" if shards[0].name.endswith(".gz") else ".tar"
    mode = "w:gz" if suffix == ".tar.gz" else "w"
    for split in ("train", "dev"):
        (out / split).mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "dev" / f"0{suffix}", mode) as dev:
        for i, shard in enumerate(shards):
            with (
                tarfile.open(shard, "r|*") as src,
                tarfile.open(out / "train" / f"{i}{suffix}", mode) as train,
            ):
                for member in src:
                    m = _KEY.match(member.name)
                    target = dev if m and m.group(1) in dev_keys else train
                    target.addfile(member, src.extractfile(member) if member.isfile() else None)
    (out / "train" / "nshards.txt").write_text(str(len(shards)))
    (out / "dev" / "nshards.txt").write_text("1")
    record = {
        "source": "train",
        "seed": seed,
        "dev_samples": size,
        "train_samples": len(keys) - size,
        "why": "the Hub set has no dev split; dev is a seeded draw from train and is removed from train",
        "dev_keys": sorted(dev_keys),
    }
    (out / "dev_split.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
