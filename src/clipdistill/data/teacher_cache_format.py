"""A teacher cache folder (data/teacher_cache.py builds one): its layout, fingerprint parts and the reader
the training streams use (`TeacherCache`).

Layout of a cache folder (memory-mapped .npy arrays, sharded like the data):

    cache.json                      fingerprint and its parts, K, widths, teacher scale, shard list
    shards/00000/meta.json          shard name, size, samples, shard fingerprint
    shards/00000/keys.json          sample keys in stored order (the row index)
    shards/00000/aug.npy            n x K x 9 view parameters (augment.AUG_FIELDS)
    shards/00000/image.npy          n x K x d teacher image embeddings (raw, unnormalised)
    shards/00000/pooled.npy         n x K x w pooled features (only with pooled=True)
    shards/00000/text.npy           m x d teacher text embeddings of every caption, in sample order
    shards/00000/text_offsets.npy   n + 1 row offsets into text.npy

Fingerprint = teacher identity + weights hash + preprocessing + augmentation policy (with K and the
seed) + data shard names and sizes.

Ensemble teachers (models/ensemble.py, docs/methods.md section 7.1) write format 2, which a format-1
reader refuses; format-1 (single-teacher) caches are unchanged and still load. In format 2 the arrays keep
their names and shapes, and each embedding row is the members' L2-normalised embeddings joined in member
order (MobileCLIP's layout): `image.npy` is n x K x (d_1 + ... + d_M), `text.npy` is m x (d_1 + ... + d_M),
and `pooled.npy` joins the members' raw pooled features. `cache.json` adds `members`: per member its
spec, `embed_dim`, `pooled_dim` and `logit_scale`. The fingerprint's teacher parts then list every member's
identity, weights hash and preprocessing, in order; `weights` is the hash of the members' hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clipdistill.data.augment import AugmentPolicy
from clipdistill.data.loader import shard_identity, shard_name
from clipdistill.errors import UserError
from clipdistill.paths import atomic_path

if TYPE_CHECKING:
    # models.base names the model interface; data uses it in annotations only, so it is not imported at run
    # time (data sits below models: docs/import_graph.md).
    from clipdistill.models.base import ClipModel

log = logging.getLogger(__name__)

FORMAT = 1  # a single teacher
ENSEMBLE_FORMAT = 2  # an ensemble teacher: `members` in cache.json, member blocks in every embedding row
INFO_FILE = "cache.json"


def weights_hash(model: torch.nn.Module) -> str:
    """A digest of the model's weights (the model's own `fingerprint()` when it has one)."""
    fingerprint = getattr(model, "fingerprint", None)
    if callable(fingerprint):
        return str(fingerprint())
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def ensemble_weights(hashes: list[str]) -> str:
    """The weights hash of an ensemble: a digest of its members' hashes, in order."""
    return digest({"ensemble": list(hashes)})


def ensemble_members(teacher: ClipModel) -> list[ClipModel] | None:
    """The members of an ensemble teacher (`models.ensemble.EnsembleModel`), None for a single teacher."""
    members = getattr(teacher, "members", None)
    return list(members) if isinstance(members, torch.nn.ModuleList) else None


def _single_parts(teacher: ClipModel) -> dict:
    return {
        "teacher": getattr(teacher, "spec", None) or teacher.name,
        "weights": weights_hash(teacher),
        "preprocessing": teacher.image_config.as_dict(),
    }


def teacher_parts(teacher: ClipModel) -> dict:
    """The teacher-side fingerprint parts: identity, weights hash, preprocessing; for an ensemble also
    `members`, each member's parts in order (and `weights` the hash of their hashes)."""
    members = ensemble_members(teacher)
    if members is None:
        return _single_parts(teacher)
    parts = [_single_parts(m) for m in members]
    return {
        "teacher": getattr(teacher, "spec", None) or teacher.name,
        "weights": ensemble_weights([p["weights"] for p in parts]),
        "preprocessing": [p["preprocessing"] for p in parts],
        "members": parts,
    }


def fingerprint_parts(teacher: dict, policy: AugmentPolicy, k: int, seed: int, shards: list[dict]) -> dict:
    return {**teacher, "augment": {**policy.as_dict(), "k": int(k), "seed": int(seed)}, "shards": shards}


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, obj: object) -> None:
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class CacheShard:
    """One shard's arrays, memory-mapped on first use (so each DataLoader worker maps its own)."""

    def __init__(self, folder: Path, meta: dict) -> None:
        self.folder = folder
        self.meta = meta
        self.name = meta["name"]
        self.augmentations = int(meta["augmentations"])
        self._arrays: dict[str, np.ndarray] = {}
        self._rows: dict[str, int] | None = None

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            path = self.folder / f"{name}.npy"
            if not path.exists():
                raise UserError(
                    f"teacher cache shard '{self.folder}' has no {name}.npy; rebuild it with `clipdistill cache-teacher`"
                )
            try:
                self._arrays[name] = np.load(path, mmap_mode="r")
            except (
                OSError,
                ValueError,
            ) as err:  # e.g. a file cut short: "mmap length is greater than file size"
                raise UserError(
                    f"teacher cache array '{path}' is damaged or cut short ({err}); rebuild the cache with "
                    "`clipdistill cache-teacher ... --overwrite`"
                ) from None
        return self._arrays[name]

    def verify(self) -> None:
        """Open the shard's main arrays now (headers only), so a damaged cache is refused before training."""
        samples = int(self.meta.get("samples", -1))
        for name in ("aug", "image"):
            rows = self._array(name).shape[0]
            if samples >= 0 and rows != samples:
                raise UserError(
                    f"teacher cache array '{self.folder / name}.npy' has {rows} rows for {samples} samples; "
                    "rebuild the cache with `clipdistill cache-teacher ... --overwrite`"
                )

    aug = property(lambda self: self._array("aug"))
    image = property(lambda self: self._array("image"))
    pooled = property(lambda self: self._array("pooled"))
    text = property(lambda self: self._array("text"))
    text_offsets = property(lambda self: self._array("text_offsets"))

    def row(self, key: str) -> int | None:
        if self._rows is None:
            keys = json.loads((self.folder / "keys.json").read_text())
            self._rows = {k: i for i, k in enumerate(keys)}
        return self._rows.get(key)

    def text_index(self, row: int, caption: int) -> int:
        """Index into the per-caption arrays (`text.npy` and extras) of caption `caption` of sample `row`."""
        start, end = int(self.text_offsets[row]), int(self.text_offsets[row + 1])
        if not 0 <= caption < end - start:
            raise IndexError(f"caption {caption} of row {row} out of range ({end - start} cached)")
        return start + caption

    def text_row(self, row: int, caption: int) -> np.ndarray:
        return self.text[self.text_index(row, caption)]

    def extra(self, name: str) -> np.ndarray:
        """An extra per-caption array stored beside the cache (e.g. DCLIP's `dclip_image`)."""
        return self._array(name)


@dataclass
class CacheInfo:
    fingerprint: str
    parts: dict
    augmentations: int
    embed_dim: int
    pooled_dim: int | None
    logit_scale: float
    text: bool
    shards: list[dict]
    members: list[dict] | None = None  # ensemble caches: per member spec, embed_dim, pooled_dim, logit_scale

    def member_columns(self, key: str = "embed_dim") -> list[tuple[int, int]]:
        """Each member's (start, end) columns in a stored row of embeddings (`embed_dim`) or pooled
        features (`pooled_dim`); one span for a single-teacher cache."""
        if self.members is None:
            width = self.embed_dim if key == "embed_dim" else self.pooled_dim
            return [(0, int(width or 0))]
        spans, start = [], 0
        for m in self.members:
            width = int(m.get(key) or 0)
            spans.append((start, start + width))
            start += width
        return spans

    @property
    def policy(self) -> AugmentPolicy:
        spec = {k: v for k, v in self.parts["augment"].items() if k not in ("k", "seed")}
        return AugmentPolicy.from_dict(spec)

    @property
    def seed(self) -> int:
        return int(self.parts["augment"]["seed"])

    @property
    def samples(self) -> int:
        return sum(int(s["samples"]) for s in self.shards)


class TeacherCache:
    """A finished cache folder (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        info_file = self.root / INFO_FILE
        if not info_file.exists():
            raise UserError(
                f"'{self.root}' is not a finished teacher cache (no {INFO_FILE}); build it with "
                f"`clipdistill cache-teacher --teacher SPEC --data DATA --out {self.root}`"
            )
        try:
            raw = json.loads(info_file.read_text())
            if raw.get("format") not in (FORMAT, ENSEMBLE_FORMAT):
                raise ValueError(f"format {raw.get('format')} (expected {FORMAT} or {ENSEMBLE_FORMAT})")
            if (raw["format"] == ENSEMBLE_FORMAT) != bool(raw.get("members")):
                raise ValueError(f"format {raw['format']} with members {raw.get('members')!r}")
            self.info = CacheInfo(
                **{k: raw[k] for k in CacheInfo.__dataclass_fields__ if k in raw or k != "members"}
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"cannot read teacher cache '{info_file}' ({err}); rebuild it with `clipdistill cache-teacher`"
            ) from err
        self._shards = {s["name"]: CacheShard(self.root / "shards" / s["dir"], s) for s in self.info.shards}

    def shard(self, name: str) -> CacheShard | None:
        """The cache shard of data shard `name` (`dataset/split/file`), or None."""
        return self._shards.get(name)

    def lookup(self, name: str, key: str) -> tuple[CacheShard, int] | None:
        shard = self._shards.get(name)
        if shard is None:
            return None
        row = shard.row(key)
        return None if row is None else (shard, row)

    def check(
        self,
        *,
        shards: list[Path] | None = None,
        teacher: dict | None = None,
        policy: AugmentPolicy | None = None,
        pooled: bool = False,
        text: bool = False,
    ) -> None:
        """Refuse (UserError naming the first disagreement) a cache built for another run."""
        fix = "rebuild it with `clipdistill cache-teacher ... --out DIR` or point teacher.cache at a matching cache"
        parts = self.info.parts
        teacher = dict(teacher or {})
        spec = teacher.pop("teacher", None)
        if teacher:
            self._check_members(teacher.pop("members", None), spec)
        # The weights hash is the teacher's identity; the spec string only names it (a moved folder is fine).
        for key, value in teacher.items():
            if parts.get(key) != value:
                raise UserError(
                    f"teacher cache '{self.root}' was built with a different {key} (cache: {_short(parts.get(key))}, "
                    f"run: {_short(value)}); {fix}"
                )
        if spec is not None and spec != parts.get("teacher"):
            log.info(
                "teacher cache %s was built from '%s'; the run names '%s' (same weights)",
                self.root,
                parts.get("teacher"),
                spec,
            )
        if policy is not None and self.info.policy != policy:
            raise UserError(
                f"teacher cache '{self.root}' was built with augmentation policy {self.info.policy.as_dict()}, the run "
                f"asks for {policy.as_dict()}; drop data.augment to use the cache's policy or {fix}"
            )
        cached = {s["name"]: int(s["bytes"]) for s in parts["shards"]}
        for ident in shard_identity(shards or []):
            if ident["name"] not in cached:
                raise UserError(
                    f"teacher cache '{self.root}' has no entry for data shard '{ident['name']}' (it holds "
                    f"{', '.join(sorted(cached)) or 'none'}); {fix}"
                )
            if cached[ident["name"]] != ident["bytes"]:
                raise UserError(
                    f"data shard '{ident['name']}' has {ident['bytes']} bytes but the teacher cache '{self.root}' was built "
                    f"from {cached[ident['name']]} bytes; {fix}"
                )
        if pooled and self.info.pooled_dim is None:
            raise UserError(
                f"teacher cache '{self.root}' has no pooled features but a loss term needs them; rebuild it with --pooled"
            )
        if text and not self.info.text:
            raise UserError(
                f"teacher cache '{self.root}' holds no caption embeddings (built from unlabeled data); {fix}"
            )
        wanted = {shard_name(p) for p in shards} if shards else set(self._shards)
        for name in sorted(wanted & set(self._shards)):
            self._shards[name].verify()

    def _check_members(self, run: list[dict] | None, spec: str | None) -> None:
        """Refuse an ensemble cache for a single teacher, a single-teacher cache for an ensemble, and an
        ensemble cache for another ensemble (other members, weights, preprocessing or order)."""
        cached = self.info.parts.get("members")
        if run is None and cached is None:
            return
        build = "`clipdistill cache-teacher --teacher SPEC [--teacher SPEC ...] --data ... --out DIR`"
        if run is None:
            raise UserError(
                f"teacher cache '{self.root}' holds an ensemble of {len(cached)} teachers {_names(cached)}, but the "
                f"run's teacher is the single model '{spec}'; set teacher.spec to the list {_names(cached)}, or "
                f"build a cache for '{spec}' with {build}"
            )
        if cached is None:
            raise UserError(
                f"teacher cache '{self.root}' holds the single teacher '{self.info.parts.get('teacher')}', but the "
                f"run's teacher is an ensemble of {len(run)} {_names(run)}; build an ensemble cache with {build} "
                "(one --teacher per member, in the run's order), or set teacher.spec to that single teacher"
            )
        key = lambda m: (m["weights"], m["preprocessing"])  # noqa: E731 - a moved folder keeps its weights
        if [key(m) for m in cached] != [key(m) for m in run]:
            raise UserError(
                f"teacher cache '{self.root}' holds the ensemble {_names(cached)}, but the run's teacher is the "
                f"ensemble {_names(run)} (other members, weights, preprocessing or order); set teacher.spec to "
                f"the cache's members in its order, or build a cache for the run's with {build}"
            )


def _names(members: list[dict]) -> str:
    return "[" + ", ".join(str(m["teacher"]) for m in members) + "]"


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
