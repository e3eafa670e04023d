"""DCLIP's meta-teacher as teacher-cache extras (docs/methods.md section 6): train the cross-modal head once on the
frozen teacher's tokens and store its enriched embeddings beside a teacher cache, so the `dclip` term
trains from the cache like every other term (no online teacher, whose image tower runs at ~17 img/s here).

`build_dclip_extras(teacher, shards, cache_root)`:
1. for every cached sample, the teacher's image tokens of its stored view (the final feature map,
   average-pooled to `token_grid` x `token_grid` regions: the "patch or region tokens" of
   docs/methods.md section 6, standing in for the paper's YOLO regions) and the text tokens of each
   caption (padding masked);
2. trains `DclipMetaHead` with its symmetric InfoNCE (tau 0.05) on (image, one random caption) pairs,
   seeded, AdamW, `epochs` passes;
3. writes per caption (rows aligned with the cache's `text.npy`) the enriched image embedding v*_t of
   the (image, caption) pair and the enriched text embedding t*_t to `dclip_image.npy`, `dclip_text.npy`
   in each cache shard, the head to `dclip_head.pt` and `dclip.json` (its config, loss curve, and the
   cache fingerprint it belongs to) last, so an interrupted build leaves no extras that look finished.

The training loader then hands the rows of the caption it drew to the term as `Outputs.extra`
(`image_enriched`, `text_enriched`). Needs a single-view cache (K = 1): the enriched image depends on the
view, and one view per sample is what the head saw.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipdistill.data.augment import replay
from clipdistill.data.loader import decode_record, read_raw, shard_name
from clipdistill.data.shards import SkipCounter
from clipdistill.data.teacher_cache import TeacherCache, teacher_parts
from clipdistill.errors import UserError
from clipdistill.losses.dclip import DclipMetaHead
from clipdistill.paths import atomic_path

log = logging.getLogger(__name__)

INFO_FILE = "dclip.json"
EXTRAS = {"image_enriched": "dclip_image", "text_enriched": "dclip_text"}


@dataclass
class MetaTeacherConfig:
    token_grid: int = 3  # image tokens: feature map average-pooled to grid x grid regions (0: every position)
    max_text_tokens: int = 32
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.01
    tau: float = 0.05
    num_heads: int = 8
    seed: int = 0
    faithful: bool = False  # DclipMetaHead's `faithful` (the code's averaged image target)


def has_dclip_extras(cache: TeacherCache) -> bool:
    path = cache.root / INFO_FILE
    if not path.exists():
        return False
    info = json.loads(path.read_text())
    return info.get("cache_fingerprint") == cache.info.fingerprint


def _image_tokens(teacher, views: torch.Tensor, grid: int) -> torch.Tensor:
    """N x R x w region tokens of the teacher's final feature map."""
    feats = teacher.image_features(views.to(teacher.device), tokens=True)
    tok = feats.tokens.float()
    if grid <= 0:
        return tok.cpu()
    n, length, w = tok.shape
    side = int(round(length**0.5))
    if side * side != length:
        raise UserError(f"teacher image tokens ({length}) are not a square feature map; use token_grid 0")
    fmap = tok.transpose(1, 2).reshape(n, w, side, side)
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2).cpu()


@torch.no_grad()
def _shard_tokens(
    teacher, path: Path, cache: TeacherCache, cfg: MetaTeacherConfig, skipped: SkipCounter
) -> dict | None:
    """One shard's image region tokens (row order of the cache) and caption tokens; None when none is cached."""
    name = shard_name(path)
    images: list[torch.Tensor] = []
    rows: list[int] = []
    captions: list[tuple[int, int, str]] = []  # (row, caption index, text)
    pending: list[torch.Tensor] = []
    for raw in tqdm(read_raw([path], skipped), desc=f"dclip tokens {name}", unit="img", leave=False):
        sample = decode_record(raw, skipped, text=True)
        hit = cache.lookup(sample.shard, sample.key) if sample is not None else None
        if hit is None:
            continue
        shard, row = hit
        pending.append(replay(sample.image, shard.aug[row, 0], teacher.image_config))
        rows.append(row)
        captions += [(row, c, text) for c, text in enumerate(sample.captions)]
        if len(pending) >= 64:
            images.append(_image_tokens(teacher, torch.stack(pending), cfg.token_grid).half())
            pending = []
    if pending:
        images.append(_image_tokens(teacher, torch.stack(pending), cfg.token_grid).half())
    if not rows:
        return None
    order = torch.as_tensor(np.argsort(rows))
    texts = [t for _, _, t in captions]
    tok_list, mask_list = [], []
    for i in range(0, len(texts), 256):
        ids = teacher.tokenize(texts[i : i + 256]).to(teacher.device)[:, : cfg.max_text_tokens]
        f = teacher.text_features(ids, tokens=True)
        pad = cfg.max_text_tokens - f.tokens.shape[1]
        tok_list.append(F.pad(f.tokens.float(), (0, 0, 0, pad)).half().cpu())
        mask_list.append(F.pad(f.mask.bool(), (0, pad), value=False).cpu())
    return {
        "rows": sorted(rows),
        "image": torch.cat(images)[order],
        "captions": captions,
        "text": torch.cat(tok_list),
        "mask": torch.cat(mask_list),
    }


def _collect_tokens(teacher, shards: list[Path], cache: TeacherCache, cfg: MetaTeacherConfig) -> dict:
    skipped = SkipCounter()
    out = {}
    for path in shards:
        tokens = _shard_tokens(teacher, path, cache, cfg, skipped)
        if tokens is not None:
            out[shard_name(path)] = tokens
    return out


def _train_head(tokens: dict, dim: int, cfg: MetaTeacherConfig) -> tuple[DclipMetaHead, list[float]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    first = next(iter(tokens.values()))
    head = DclipMetaHead(
        dim, first["image"].shape[-1], first["text"].shape[-1], num_heads=cfg.num_heads, faithful=cfg.faithful
    )
    # one entry per sample: (shard, row position, [caption indices into that shard's text tokens])
    samples = []
    for name, t in tokens.items():
        pos = {row: i for i, row in enumerate(t["rows"])}
        by_row: dict[int, list[int]] = {}
        for j, (row, _, _) in enumerate(t["captions"]):
            by_row.setdefault(row, []).append(j)
        samples += [(name, pos[row], caps) for row, caps in by_row.items()]
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    head.train()
    for _ in tqdm(range(cfg.epochs), desc="dclip head", unit="epoch", leave=False):
        perm = torch.randperm(len(samples), generator=gen).tolist()
        total, count = 0.0, 0
        for i in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
            batch = [samples[j] for j in perm[i : i + cfg.batch_size]]
            img = torch.stack([tokens[s]["image"][p] for s, p, _ in batch]).float()
            pick = [caps[int(torch.randint(len(caps), (1,), generator=gen))] for _, _, caps in batch]
            txt = torch.stack([tokens[s]["text"][c] for (s, _, _), c in zip(batch, pick)]).float()
            mask = torch.stack([tokens[s]["mask"][c] for (s, _, _), c in zip(batch, pick)])
            v, t = head(img, txt, mask)
            loss = DclipMetaHead.contrastive_loss(v, t, cfg.tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item(), count + 1
        losses.append(total / max(count, 1))
    return head.eval().requires_grad_(False), losses


def build_dclip_extras(
    teacher,
    shards: list[Path],
    cache_root: str | Path,
    cfg: MetaTeacherConfig | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Train the DCLIP head on `teacher`'s tokens of the cached samples and store its enriched
    embeddings in the teacher cache at `cache_root` (see module docstring). Returns the head file."""
    cfg = cfg or MetaTeacherConfig()
    cache = TeacherCache(cache_root)
    cache.check(shards=shards, teacher=teacher_parts(teacher), text=True)
    if cache.info.augmentations != 1:
        raise UserError(
            f"DCLIP extras need a single-view teacher cache (--augmentations 1); '{cache.root}' holds "
            f"{cache.info.augmentations} views per sample"
        )
    if has_dclip_extras(cache) and not overwrite:
        log.info("DCLIP extras of %s are up to date; reusing them", cache.root)
        return cache.root / "dclip_head.pt"
    (cache.root / INFO_FILE).unlink(missing_ok=True)
    start = time.time()
    teacher.eval()
    tokens = _collect_tokens(teacher, shards, cache, cfg)
    if not tokens:
        raise UserError(
            f"no sample of {', '.join(shard_name(p) for p in shards)} is in the teacher cache '{cache.root}'"
        )
    head, losses = _train_head(tokens, int(cache.info.embed_dim), cfg)
    head.save(cache.root / "dclip_head.pt")
    with torch.no_grad():
        for name, t in tokens.items():
            shard = cache.shard(name)
            m = len(shard.text)
            img_out = np.zeros((m, cache.info.embed_dim), np.float32)
            txt_out = np.zeros((m, cache.info.embed_dim), np.float32)
            pos = {row: i for i, row in enumerate(t["rows"])}
            for i in range(0, len(t["captions"]), 512):
                part = t["captions"][i : i + 512]
                img = torch.stack([t["image"][pos[row]] for row, _, _ in part]).float()
                v, w = head(img, t["text"][i : i + 512].float(), t["mask"][i : i + 512])
                for (row, c, _), vi, wi in zip(part, v, w):
                    j = shard.text_index(row, c)
                    img_out[j], txt_out[j] = vi.numpy(), wi.numpy()
            for key, array in ((EXTRAS["image_enriched"], img_out), (EXTRAS["text_enriched"], txt_out)):
                tmp = atomic_path(shard.folder / f"{key}.npy")
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, shard.folder / f"{key}.npy")
    info = {
        "cache_fingerprint": cache.info.fingerprint,
        "config": asdict(cfg),
        "losses": losses,
        "head": "dclip_head.pt",
        "seconds": round(time.time() - start, 1),
    }
    tmp = atomic_path(cache.root / INFO_FILE)
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, cache.root / INFO_FILE)
    log.info(
        "DCLIP extras for %s: head loss %s in %.0f s",
        cache.root,
        [round(x, 3) for x in losses],
        info["seconds"],
    )
    return cache.root / "dclip_head.pt"
