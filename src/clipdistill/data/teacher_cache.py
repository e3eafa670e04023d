"""The teacher cache (docs/methods.md section 7; issue 7): take the teacher out of the training loop.

For every sample of the training shards `build_cache` stores the parameters of K random views
(`augment.sample_params`), the teacher's image embedding of each view (plus its pre-projection pooled
features when asked) and the teacher's text embedding of every caption. Training replays a stored view
on the raw image at the student's resolution (`augment.replay`) and reads the stored embeddings, so no
teacher embedding is ever computed twice for the same image and view.

An ensemble teacher (models/ensemble.py) is cached member by member: every member embeds the same K
views, each replayed at that member's own preprocessing, and a stored row joins the members' normalised
embeddings (docs/methods.md section 7.1).

The folder's layout, its fingerprint and the reader (`TeacherCache`, also importable from here) are in
data/teacher_cache_format.py. Each shard folder is written to a temporary name and renamed, and
`cache.json` is written last, so an interrupted build leaves no half cache and a rerun keeps the
finished shards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from clipdistill.data.augment import AUG_WIDTH, AugmentPolicy, replay_many, sample_params, stable_seed
from clipdistill.data.loader import decode_record, shard_identity, shard_name
from clipdistill.data.shards import SkipCounter, read_records
from clipdistill.data.teacher_cache_format import (
    ENSEMBLE_FORMAT,
    FORMAT,
    INFO_FILE,
    CacheInfo,
    CacheShard,
    TeacherCache,
    digest,
    ensemble_members,
    fingerprint_parts,
    teacher_parts,
    weights_hash,
    write_json,
)
from clipdistill.errors import UserError

if TYPE_CHECKING:
    # models.base names the model interface; data uses it in annotations only, so it is not imported at run
    # time (data sits below models: docs/import_graph.md).
    from clipdistill.models.base import ClipModel

log = logging.getLogger(__name__)

__all__ = ["TeacherCache", "build_cache", "teacher_parts", "CacheInfo", "CacheShard", "weights_hash"]


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
    members = ensemble_members(teacher)
    entries: list[dict] = []
    pooled_dim = pooled_dims = None
    for i, (path, ident) in enumerate(zip(shards, idents)):
        shard_fp = digest({"fingerprint": fingerprint, "shard": ident})
        folder = out / "shards" / f"{i:05d}"
        meta = _read_meta(folder)
        if meta is None or meta.get("fingerprint") != shard_fp:
            meta = _build_shard(
                members or [teacher],
                members is not None,
                path,
                folder,
                shard_fp,
                augmentations,
                policy,
                seed,
                pooled,
                text,
                batch_size,
                dtype,
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
        pooled_dims = meta.get("pooled_dims") or pooled_dims
    info = {
        "format": FORMAT if members is None else ENSEMBLE_FORMAT,
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
    if members is not None:
        info["members"] = [
            {
                "teacher": getattr(m, "spec", None) or m.name,
                "embed_dim": int(m.embed_dim),
                "pooled_dim": pooled_dims[k] if pooled_dims else None,
                "logit_scale": float(m.logit_scale().detach()),
            }
            for k, m in enumerate(members)
        ]
    write_json(out / INFO_FILE, info)
    return TeacherCache(out)


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


@torch.no_grad()
def _build_shard(
    models, joined, path, folder, shard_fp, k, policy, seed, pooled, text, batch_size, dtype
) -> dict:
    """One shard's cache. `models`: [the teacher], or an ensemble's members with `joined` True: every
    member embeds the same views at its own preprocessing, and each row joins their normalised embeddings."""
    name = shard_name(path)
    skipped = SkipCounter()
    keys: list[str] = []
    augs: list[np.ndarray] = []
    captions: list[str] = []
    offsets = [0]
    image_out: list[np.ndarray] = []
    pooled_out: list[np.ndarray] = []
    pending: list[list[torch.Tensor]] = [[] for _ in models]  # per model: its views of the pending samples
    centre: list[bool] = []
    pooled_dims: list[int] | None = None

    def flush() -> None:
        nonlocal pooled_dims
        if not centre:
            return
        flags = torch.tensor(centre)
        embs, pools = [], []
        for model, views in zip(models, pending):
            emb, pool = _embed_views(model, torch.cat(views).to(model.device), flags, pooled)
            embs.append(_unit(emb) if joined else emb)
            pools.append(pool)
            views.clear()
        image_out.append(np.concatenate(embs, axis=1))
        if pooled:
            pooled_out.append(np.concatenate(pools, axis=1))
            pooled_dims = [int(p.shape[-1]) for p in pools]
        centre.clear()

    bar = tqdm(desc=f"teacher cache {name}", unit="img", leave=False)
    for raw in read_records([path], skipped):
        sample = decode_record(raw, skipped, text=text)
        if sample is None:
            continue
        rng = np.random.default_rng(stable_seed(seed, "cache", name, sample.key))
        params = sample_params(policy, sample.image.width, sample.image.height, k, rng)
        for model, views in zip(models, pending):
            views.append(replay_many(sample.image, params, model.image_config))
        centre.extend(bool(row[AUG_WIDTH - 1] >= 0.5) for row in params)
        keys.append(sample.key)
        augs.append(params)
        if text:
            captions.extend(sample.captions)
        offsets.append(len(captions))
        bar.update(1)
        if len(centre) >= batch_size:
            flush()
    flush()
    bar.close()
    n = len(keys)
    width = sum(int(m.embed_dim) for m in models)
    image = np.concatenate(image_out).reshape(n, k, -1) if n else np.zeros((0, k, width), np.float32)
    if captions:
        texts = [_encode_texts(m, captions) for m in models]
        text_emb = np.concatenate([_unit(t) for t in texts] if joined else texts, axis=1)
    else:
        text_emb = np.zeros((0, width), np.float32)
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
        if joined:
            meta["pooled_dims"] = pooled_dims
    np.save(tmp / "text.npy", text_emb.astype(dtype))
    np.save(tmp / "text_offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / "keys.json").write_text(json.dumps(keys))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    if skipped.total:
        log.warning("teacher cache %s: skipped %d samples %s", name, skipped.total, skipped.reasons)
    return meta


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised as `F.normalize` does (an online ensemble teacher normalises the same way)."""
    return torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()


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
