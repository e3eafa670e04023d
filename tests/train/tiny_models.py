"""Tiny models for the engine tests: a random open_clip ViT student and a fake teacher, both registered
under spec prefixes so that subprocesses (resume tests) can build them too (`register()`)."""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.models.base import ClipModel, Features, ImageConfig

STUDENT_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
STUDENT = "openclip:cdtest-vit"


class FakeTeacher(ClipModel):
    """A tiny conv image tower + bag-of-words text tower with fixed random weights (seeded), its own
    resolution (20 px) and normalisation (0.5/0.5). `images_seen` counts embedded images."""

    def __init__(self, dim: int = 24, seed: int = 0) -> None:
        super().__init__()
        self.name = f"fake-teacher-{dim}-{seed}"
        self.embed_dim = dim
        self.image_config = ImageConfig(size=20, resize=20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.conv = nn.Conv2d(3, 8, 5, stride=3)
        self.head = nn.Linear(8, dim)
        self.words = nn.Embedding(1000, 12, padding_idx=0)
        self.text_head = nn.Linear(12, dim)
        self._scale = nn.Parameter(torch.tensor(math.log(50.0)))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name != "_scale":
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.images_seen = 0

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        self.images_seen += images.shape[0]
        fmap = F.relu(self.conv(images))
        pooled = fmap.mean((2, 3))
        return Features(
            embedding=self.head(pooled),
            pooled=pooled,
            tokens=fmap.flatten(2).transpose(1, 2) if tokens else None,
        )

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        mask = text != 0
        tok = self.words(text)
        pooled = (tok * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return Features(
            embedding=self.text_head(pooled),
            pooled=pooled,
            tokens=tok if tokens else None,
            mask=mask if tokens else None,
        )

    def tokenize(self, texts: list[str]) -> Tensor:
        ids = torch.zeros(len(texts), 8, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [zlib.crc32(w.encode()) % 999 + 1 for w in t.lower().split()][:8]
            ids[i, : len(words)] = torch.tensor(words, dtype=torch.long)
        return ids

    def raw_logit_scale(self) -> Tensor:
        return self._scale


def _fake_teacher(rest: str) -> FakeTeacher:
    dim, _, seed = (rest or "24").partition("/")
    return FakeTeacher(int(dim), int(seed or 0))


def register() -> None:
    """Make `openclip:cdtest-vit` and `fake:DIM[/SEED]` specs buildable (idempotent)."""
    import open_clip

    from clipdistill.models.factory import register_adapter

    if "cdtest-vit" not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="cdtest-configs-"))
        (folder / "cdtest-vit.json").write_text(json.dumps(STUDENT_CFG))
        open_clip.add_model_config(folder)
    register_adapter("fake", _fake_teacher)


def base_config(root, out, **changes) -> dict:
    cfg = {
        "student": {"spec": STUDENT},
        "teacher": {"spec": "fake:24"},
        "data": {
            "train": ["caps:train"],
            "root": str(root),
            "batch_size": 8,
            "workers": 0,
            "shuffle_buffer": 8,
        },
        "losses": {"clip": 1.0, "crd": 1.0, "fd": 10.0},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "steps": 6,
        "output_dir": str(out),
        "seed": 0,
        "log_every": 1,
        "checkpoint_every": 2,
        "deterministic": True,
        "threads": 1,
    }
    for key, value in changes.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg
