"""The teacher cache (docs/methods.md section 7; issue 7): take the teacher out of the training loop.

For every sample of the training shards `build_cache` stores the parameters of K random views
(`augment.sample_params`), the teacher's image embedding of each view (plus its pre-projection pooled
features when asked) and the teacher's text embedding of every caption. Training replays a stored view
on the raw image at the student's resolution (`augment.replay`) and reads the stored embeddings, so no
teacher embedding is ever computed twice for the same image and view.

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
seed) + data shard names and sizes. Each shard folder is written to a temporary name and renamed, and
`cache.json` is written last, so an interrupted build leaves no half cache and a rerun keeps the
finished shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipdistill.data.augment import AUG_WIDTH, AugmentPolicy, replay_many, sample_params, stable_seed
from clipdistill.data.loader import decode_record, shard_identity, shard_name
from clipdistill.data.shards import SkipCounter, read_records
from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel
from clipdistill.paths import atomic_path

log = logging.getLogger(__name__)

FORMAT = 1
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


def teacher_parts(teacher: ClipModel) -> dict:
    """The teacher-side fingerprint parts: identity, weights hash, preprocessing."""
    return {
        "teacher": getattr(teacher, "spec", None) or teacher.name,
        "weights": weights_hash(teacher),
        "preprocessing": teacher.image_config.as_dict(),
    }


def fingerprint_parts(teacher: dict, policy: AugmentPolicy, k: int, seed: int, shards: list[dict]) -> dict:
    return {**teacher, "augment": {**policy.as_dict(), "k": int(k), "seed": int(seed)}, "shards": shards}


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: object) -> None:
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
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')} (expected {FORMAT})")
            self.info = CacheInfo(**{k: raw[k] for k in CacheInfo.__dataclass_fields__})
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


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


@contextmanager
def _without_feature_cache(model: ClipModel):
    """Augmented views are never seen twice: keep them out of a model's own feature cache."""
    saved = getattr(model, "feature_cache", None)
    if saved is not None:
        model.feature_cache = None
    try:
        yield
    finally:
        if saved is not None:
            model.feature_cache = saved


def build_cache(
    teacher: ClipModel,
    shards: list[Path],
    out: str | Path,
    *,
    augmentations: int = 5,
    policy: AugmentPolicy | None = None,
    seed: int = 0,
    pooled: bool = False,
    text: bool = True,
    batch_size: int = 64,
    dtype: str = "float32",
    overwrite: bool = False,
) -> TeacherCache:
    """Compute (or reuse) the teacher cache of `shards` in `out`; returns it opened."""
    out = Path(out).expanduser()
    policy = policy or AugmentPolicy()
    if augmentations < 1:
        raise UserError(f"--augmentations {augmentations} must be >= 1")
    if dtype not in ("float32", "float16"):
        raise UserError(f"cache dtype '{dtype}' must be float32 or float16")
    idents = shard_identity(shards)
    parts = fingerprint_parts(teacher_parts(teacher), policy, augmentations, seed, idents)
    fingerprint = digest({"parts": parts, "pooled": pooled, "text": text, "dtype": dtype})
    if (out / INFO_FILE).exists():
        existing = TeacherCache(out)
        if existing.info.fingerprint == fingerprint:
            log.info("teacher cache %s is up to date (fingerprint %s); reusing it", out, fingerprint)
            return existing
        if not overwrite:
            raise UserError(
                f"'{out}' holds a teacher cache for another teacher, data or policy; pass --overwrite or a new --out"
            )
        shutil.rmtree(out / "shards", ignore_errors=True)
        (out / INFO_FILE).unlink()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    start = time.time()
    teacher.eval()
    entries: list[dict] = []
    pooled_dim = None
    for i, (path, ident) in enumerate(zip(shards, idents)):
        shard_fp = digest({"fingerprint": fingerprint, "shard": ident})
        folder = out / "shards" / f"{i:05d}"
        meta = _read_meta(folder)
        if meta is None or meta.get("fingerprint") != shard_fp:
            meta = _build_shard(
                teacher, path, folder, shard_fp, augmentations, policy, seed, pooled, text, batch_size, dtype
            )
        else:
            log.info("teacher cache: shard %s already done", ident["name"])
        entries.append(
            {
                **ident,
                "dir": folder.name,
                **{k: meta[k] for k in ("samples", "texts", "skipped", "augmentations")},
                **({"unreadable": meta["unreadable"]} if meta.get("unreadable") else {}),
            }
        )
        pooled_dim = meta.get("pooled_dim") or pooled_dim
    info = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "parts": parts,
        "augmentations": augmentations,
        "embed_dim": int(teacher.embed_dim),
        "pooled_dim": pooled_dim,
        "logit_scale": float(teacher.logit_scale().detach()),
        "text": text,
        "shards": entries,
        "dtype": dtype,
        "seconds": round(time.time() - start, 1),
    }
    _write_json(out / INFO_FILE, info)
    return TeacherCache(out)


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


@torch.no_grad()
def _build_shard(teacher, path, folder, shard_fp, k, policy, seed, pooled, text, batch_size, dtype) -> dict:
    name = shard_name(path)
    skipped = SkipCounter()
    keys: list[str] = []
    augs: list[np.ndarray] = []
    captions: list[str] = []
    offsets = [0]
    image_out: list[np.ndarray] = []
    pooled_out: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    centre: list[bool] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.cat(pending).to(teacher.device)
        flags = torch.tensor(centre)
        emb, pool = _embed_views(teacher, x, flags, pooled)
        image_out.append(emb)
        if pooled:
            pooled_out.append(pool)
        pending.clear()
        centre.clear()

    bar = tqdm(desc=f"teacher cache {name}", unit="img", leave=False)
    for raw in read_records([path], skipped):
        sample = decode_record(raw, skipped, text=text)
        if sample is None:
            continue
        rng = np.random.default_rng(stable_seed(seed, "cache", name, sample.key))
        params = sample_params(policy, sample.image.width, sample.image.height, k, rng)
        pending.append(replay_many(sample.image, params, teacher.image_config))
        centre.extend(bool(row[AUG_WIDTH - 1] >= 0.5) for row in params)
        keys.append(sample.key)
        augs.append(params)
        if text:
            captions.extend(sample.captions)
        offsets.append(len(captions))
        bar.update(1)
        if sum(len(p) for p in pending) >= batch_size:
            flush()
    flush()
    bar.close()
    n = len(keys)
    image = (
        np.concatenate(image_out).reshape(n, k, -1) if n else np.zeros((0, k, teacher.embed_dim), np.float32)
    )
    text_emb = _encode_texts(teacher, captions) if captions else np.zeros((0, teacher.embed_dim), np.float32)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "aug.npy", np.stack(augs) if n else np.zeros((0, k, AUG_WIDTH), np.float32))
    np.save(tmp / "image.npy", image.astype(dtype))
    meta = {
        "name": name,
        "fingerprint": shard_fp,
        "samples": n,
        "texts": len(captions),
        "augmentations": k,
        "skipped": dict(skipped.reasons),
        "unreadable": list(skipped.unreadable),
        "pooled_dim": None,
    }
    if pooled:
        pooled_arr = np.concatenate(pooled_out).reshape(n, k, -1) if n else np.zeros((0, k, 0), np.float32)
        np.save(tmp / "pooled.npy", pooled_arr.astype(dtype))
        meta["pooled_dim"] = int(pooled_arr.shape[-1])
    np.save(tmp / "text.npy", text_emb.astype(dtype))
    np.save(tmp / "text_offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / "keys.json").write_text(json.dumps(keys))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    if skipped.total:
        log.warning("teacher cache %s: skipped %d samples %s", name, skipped.total, skipped.reasons)
    return meta


def _embed_views(
    teacher: ClipModel, x: torch.Tensor, centre: torch.Tensor, pooled: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Teacher embeddings (and pooled features) of a batch of views, in order. Centre views go through
    the teacher's own feature cache (evaluation already filled it); random views bypass it."""
    emb = np.zeros((len(x), teacher.embed_dim), np.float32)
    pool = None
    for mask, ctx in ((centre, nullcontext()), (~centre, _without_feature_cache(teacher))):
        if not mask.any():
            continue
        with ctx:
            feats = teacher.image_features(x[mask])
        idx = mask.nonzero().squeeze(1).numpy()
        emb[idx] = feats.embedding.float().cpu().numpy()
        if pooled:
            if feats.pooled is None:
                raise UserError(f"teacher '{teacher.name}' exposes no pooled features; drop --pooled")
            if pool is None:
                pool = np.zeros((len(x), feats.pooled.shape[-1]), np.float32)
            pool[idx] = feats.pooled.float().cpu().numpy()
    return emb, pool


def _encode_texts(teacher: ClipModel, captions: list[str], batch: int = 256) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(captions), batch), desc="teacher text", unit="batch", leave=False):
        ids = teacher.tokenize(captions[i : i + batch]).to(teacher.device)
        out.append(teacher.text_features(ids).embedding.float().cpu().numpy())
    return np.concatenate(out)
