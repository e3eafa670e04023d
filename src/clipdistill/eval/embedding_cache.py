"""The evaluation caches, under `clipdistill.paths.cache_dir()`, for models that name themselves (a
`fingerprint` or the `spec` that `create_model` sets): `text_embeddings/` holds class embeddings per
(model, classes, templates), `image_features/` linear-probe features per (model, dataset split, every;
eval/runner.py). A spec alone does not pin the weights (random initialisation, a checkpoint overwritten by
training), so each entry also stores the model's embedding of a fixed probe input and is recomputed when
it differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clipdistill.eval.zeroshot import class_embeddings, evaluating
from clipdistill.models.base import ClipModel
from clipdistill.paths import atomic_path, cache_dir

log = logging.getLogger(__name__)

_PROBE_TEXT = "a photo of a dog."
_PROBE_ATOL = 1e-3  # probe embeddings agree far better than this across runs of the same weights


def model_identity(model: ClipModel) -> str | None:
    """What names `model` for the caches: its `fingerprint` (attribute or method), else its `spec`."""
    fingerprint = getattr(model, "fingerprint", None)
    if callable(fingerprint):
        fingerprint = fingerprint()
    if fingerprint:
        return f"{type(model).__name__}:{fingerprint}"
    spec = getattr(model, "spec", None)
    return str(spec) if spec else None


def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_file(kind: str, identity: str, *parts: object) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[-48:].strip("_")
    return cache_dir() / kind / f"{slug}-{_sha(identity, *parts)}.pt"


def _probe_image() -> Image.Image:
    yy, xx = np.mgrid[0:64, 0:64]
    arr = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def text_probe(model: ClipModel) -> Tensor:
    with evaluating(model):
        return model.encode_text(model.tokenize([_PROBE_TEXT]).to(model.device), normalize=True).float().cpu()


def image_probe(model: ClipModel) -> Tensor:
    with evaluating(model):
        pixels = model.preprocess(_probe_image()).unsqueeze(0).to(model.device)
        return model.encode_image(pixels, normalize=True).float().cpu()


def load_entry(path: Path, probe: Tensor, meta: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        log.warning("ignoring unreadable cache entry %s (%s)", path, err)
        return None
    if entry.get("meta") != meta or entry["probe"].shape != probe.shape:
        return None
    if not torch.allclose(entry["probe"], probe, atol=_PROBE_ATOL):
        log.info("cache entry %s is from other weights of the same model; recomputing", path.name)
        return None
    return entry


def save_entry(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    torch.save(entry, tmp)
    os.replace(tmp, path)


def cached_class_embeddings(
    model: ClipModel,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    cache: bool = True,
    progress: bool = False,
) -> Tensor:
    """`class_embeddings`, read from / written to `cache_dir()/text_embeddings` when the model names itself."""
    identity = model_identity(model) if cache else None
    if identity is None:
        return class_embeddings(model, classnames, templates, batch_size=batch_size, progress=progress)
    meta = {"identity": identity, "classnames": list(classnames), "templates": list(templates)}
    path = cache_file("text_embeddings", identity, meta["classnames"], meta["templates"])
    probe = text_probe(model)
    entry = load_entry(path, probe, meta)
    if entry is not None:
        log.debug("class embeddings from cache %s", path)
        return entry["embeddings"]
    emb = class_embeddings(model, classnames, templates, batch_size=batch_size, progress=progress)
    save_entry(path, {"meta": meta, "probe": probe, "embeddings": emb})
    return emb


def shards_state(shards: Sequence[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in shards]
