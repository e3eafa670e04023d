"""Build the composed offline teacher (docs/methods.md section 9): LiT-style alignment of locked pretrained towers.

Frozen features are computed once and cached (pooled image features through the content-addressed
`FeatureCache`; text prefixes in memory), so only the heads (and optionally the last text layers)
train: a rebuild with a warm cache takes seconds to minutes. Early stopping on Flickr8k dev mean R@1;
nothing is tuned on evaluation sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipdistill.data.shards import Sample, SkipCounter, batched, dataset_info, iter_samples
from clipdistill.losses._functional import contrastive_ce
from clipdistill.models.composed import ComposedTeacher, HeadConfig, save_teacher
from clipdistill.paths import atomic_path, cache_dir

log = logging.getLogger(__name__)


@dataclass
class TeacherBuildConfig:
    """How the heads are trained. Defaults are the recipe selected on Flickr8k dev."""

    embed_dim: int = 512
    text_unlocked: int = 0
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.1
    all_captions: bool = True  # each step pairs every image with each of its captions (5 losses)
    seed: int = 0
    dataset: str = "flickr8k"
    train_split: str = "train"
    dev_split: str = "dev"
    batch_images: int = 32
    extra: dict = field(default_factory=dict)


def pooled_features(
    model: ComposedTeacher, samples: Iterable[Sample], batch_images: int = 32, desc: str = "image tower"
) -> tuple[list[Sample], torch.Tensor]:
    """Pooled image-tower features of `samples` (through the model's feature cache). Images are
    dropped from the returned samples to keep memory flat."""
    kept: list[Sample] = []
    feats = []
    for batch in tqdm(batched(samples, batch_images), desc=desc, unit="batch", leave=False):
        x = torch.stack([model.preprocess(s.image) for s in batch])
        feats.append(model.tower_pooled(x))
        for s in batch:
            s.image = None  # type: ignore[assignment]
        kept.extend(batch)
    return kept, torch.cat(feats) if feats else torch.empty(0, model.image_width)


def text_pooled(model: ComposedTeacher, texts: list[str], batch: int = 256) -> torch.Tensor:
    """Pooled features of the locked text tower (or the hidden states entering its unlocked layers)."""
    out = []
    with torch.no_grad():
        for chunk in batched(texts, batch):
            ids = model.tokenize(chunk)
            if model.cfg.text_unlocked:
                hidden = model.text_tower.frozen_prefix(ids).half()
                out.append(F.pad(hidden, (0, 0, 0, ids.shape[1] - hidden.shape[1])))
            else:  # through the locked tower's feature cache, which the teacher cache reuses later
                out.append(model.text_features(ids).pooled)
    return torch.cat(out)


def check_image_tower(model: ComposedTeacher, data_root: str | Path | None = None) -> dict:
    """Top-1/top-5 of the tower's own ImageNet classifier on `imagenet-1k-sample` (docs/methods.md section 9:
    a correct port reaches about 84% top-1 on this re-encoded sample)."""
    info = dataset_info("imagenet-1k-sample", data_root)
    samples, pooled = pooled_features(model, iter_samples(info.shards("test")), desc="imagenet check")
    labels = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        top5 = model.imagenet_logits(pooled).topk(5, dim=1).indices
    return {
        "top1": float((top5[:, 0] == labels).float().mean()),
        "top5": float((top5 == labels[:, None]).any(1).float().mean()),
        "samples": len(samples),
    }


def _retrieval_r1(img: torch.Tensor, txt: torch.Tensor, caps_per_image: list[int]) -> tuple[float, float]:
    owner = torch.repeat_interleave(torch.arange(len(caps_per_image)), torch.tensor(caps_per_image))
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    i2t = (owner[sim.argmax(1)] == torch.arange(len(img))).float().mean().item()
    t2i = (sim.argmax(0) == owner).float().mean().item()
    return i2t, t2i


class _Pairs:
    """Cached frozen features of one split: image features, and per image its captions' text inputs."""

    def __init__(self, model: ComposedTeacher, cfg: TeacherBuildConfig, split: str, data_root) -> None:
        info = dataset_info(cfg.dataset, data_root)
        shards = info.shards(split)
        # Decoding and preprocessing thousands of images costs minutes on 2 cores even when the
        # tower features are cached, so a split's frozen features are also stored as one file.
        ident = [
            model.image_tower_id,
            model.image_config.as_dict(),
            [(p.name, p.stat().st_size) for p in shards],
        ]
        digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        split_file = cache_dir() / "teacher_build" / f"{cfg.dataset}-{split}-{digest}.pt"
        if split_file.exists():
            stored = torch.load(split_file)
            self.image, self.keys, captions, self.skipped = (
                stored[k] for k in ("image", "keys", "captions", "skipped")
            )
        else:
            skipped = SkipCounter()
            samples, self.image = pooled_features(
                model, iter_samples(shards, skipped=skipped), cfg.batch_images, desc=f"{cfg.dataset}/{split}"
            )
            self.skipped = skipped.total
            self.keys = [s.key for s in samples]
            captions = [s.captions for s in samples]
            split_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = atomic_path(split_file)
            torch.save(
                {"image": self.image, "keys": self.keys, "captions": captions, "skipped": self.skipped}, tmp
            )
            os.replace(tmp, split_file)
        self.caps_per_image = [len(c) for c in captions]
        texts = [c for caps in captions for c in caps]
        self.text = text_pooled(model, texts)
        self.mask = None
        if model.cfg.text_unlocked:
            mask = torch.cat([model.text_tower.mask(model.tokenize(c)) for c in batched(texts, 1024)])
            longest = int(mask.sum(1).max())
            self.text, self.mask = self.text[:, :longest], mask[:, :longest]
        self.first_caption = torch.tensor(np.cumsum([0] + self.caps_per_image[:-1]))

    def caption_rows(self, images: torch.Tensor, which: int | None, rng: random.Random) -> torch.Tensor:
        counts = [self.caps_per_image[i] for i in images.tolist()]
        offsets = [which % c if which is not None else rng.randrange(c) for c in counts]
        return self.first_caption[images] + torch.tensor(offsets)


def _encode_text(model: ComposedTeacher, pairs: _Pairs, rows: torch.Tensor) -> torch.Tensor:
    if model.cfg.text_unlocked:
        pooled = model.text_tower.unlocked_suffix(pairs.text[rows].float(), pairs.mask[rows])
    else:
        pooled = pairs.text[rows]
    return model.text_head(pooled)


def _dev_r1(model: ComposedTeacher, dev: _Pairs) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        img = model.image_head(dev.image)
        txt = torch.cat([_encode_text(model, dev, rows) for rows in torch.arange(len(dev.text)).split(1024)])
    model.train()
    return _retrieval_r1(img, txt, dev.caps_per_image)


def build_teacher(cfg: TeacherBuildConfig, out_dir: str | Path, data_root: str | Path | None = None) -> dict:
    """Train the heads on `cfg.dataset` train, early-stop on dev mean R@1, save to `out_dir`.

    Returns the build record (also stored in `out_dir/teacher.json`).
    """
    start = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = ComposedTeacher(HeadConfig(embed_dim=cfg.embed_dim, text_unlocked=cfg.text_unlocked))
    train = _Pairs(model, cfg, cfg.train_split, data_root)
    dev = _Pairs(model, cfg, cfg.dev_split, data_root)
    feature_seconds = time.time() - start
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train.keys)
    steps_per_epoch = max(1, n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    history, best, best_state = [], -1.0, None
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="teacher heads", unit="epoch"):
        order = torch.randperm(n, generator=gen)
        losses = []
        for step in range(steps_per_epoch):
            images = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            img = model.image_head(train.image[images])
            picks = range(max(train.caps_per_image)) if cfg.all_captions else [None]
            loss = torch.stack(
                [
                    contrastive_ce(
                        model.logit_scale()
                        * F.normalize(img, dim=-1)
                        @ F.normalize(
                            _encode_text(model, train, train.caption_rows(images, c, rng)), dim=-1
                        ).t()
                    )
                    for c in picks
                ]
            ).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        i2t, t2i = _dev_r1(model, dev)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "dev_i2t_r1": i2t, "dev_t2i_r1": t2i})
        log.info("epoch %d loss %.4f dev R@1 i2t %.3f t2i %.3f", epoch, np.mean(losses), i2t, t2i)
        if (i2t + t2i) / 2 > best:
            best = (i2t + t2i) / 2
            best_state = {k: v.clone() for k, v in model.trained_state().items()}
    model.load_trained_state(best_state)
    best_epoch = max(history, key=lambda h: h["dev_i2t_r1"] + h["dev_t2i_r1"])
    record = {
        "build": asdict(cfg),
        "train_images": len(train.keys),
        "skipped": train.skipped + dev.skipped,
        "best_epoch": best_epoch,
        "history": history,
        "feature_seconds": round(feature_seconds, 1),
        "seconds": round(time.time() - start, 1),
    }
    save_teacher(model, Path(out_dir), record)
    return record
