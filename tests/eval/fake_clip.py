"""Fake `ClipModel`s whose embeddings the tests choose: an image's embedding is looked up from its
pixels (the synthetic shards hold distinct random images), a text's embedding is the one-hot of the
index `text_index(text)` returns. Unknown images embed to zero."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from clipdistill.data.shards import dataset_info, iter_samples
from clipdistill.models.base import ClipModel, Features, ImageConfig


def _pixels(img) -> Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)


class LookupClip(ClipModel):
    def __init__(
        self, vectors: dict[bytes, Tensor], text_index: Callable[[str], int], dim: int, text_bias: float = 0.0
    ) -> None:
        super().__init__()
        self.vectors, self.text_index, self.embed_dim = vectors, text_index, dim
        self.name = "fake"
        self.image_config = ImageConfig(size=16)
        self.bias = nn.Parameter(torch.tensor(text_bias))  # a weight that changes the text probe
        self.images_seen = 0
        self.texts_seen = 0

    @property
    def preprocess(self):
        return _pixels

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        self.images_seen += len(images)
        zero = torch.zeros(self.embed_dim)
        return Features(torch.stack([self.vectors.get(x.numpy().tobytes(), zero) for x in images]))

    def tokenize(self, texts: list[str]) -> Tensor:
        return torch.tensor([[self.text_index(t)] for t in texts], dtype=torch.long)

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        self.texts_seen += len(text)
        emb = nn.functional.one_hot(text[:, 0], self.embed_dim).float()
        return Features(emb + self.bias * torch.arange(self.embed_dim).float())

    def raw_logit_scale(self) -> Tensor:
        return torch.tensor(100.0).log()


def class_index(classnames: Sequence[str]) -> Callable[[str], int]:
    """The index of the (longest) class name that appears as a word in a prompt; 0 when none does."""

    def index(text: str) -> int:
        hits = [i for i, c in enumerate(classnames) if re.search(rf"\b{re.escape(c)}\b", text)]
        return max(hits, key=lambda i: len(classnames[i])) if hits else 0

    return index


def caption_index(text: str) -> int:
    """'caption 7 one' -> 7 (the synthetic retrieval shards' captions name their sample)."""
    m = re.search(r"caption (\d+)", text)
    return int(m.group(1)) if m else 0


def lookup_model(
    root,
    name: str,
    vector: Callable[[int, object], Tensor],
    text_index: Callable[[str], int],
    dim: int,
    splits: Sequence[str] = ("test",),
    **kw,
) -> LookupClip:
    """A LookupClip whose image embedding for the i-th sample of each split is `vector(i, sample)`."""
    info = dataset_info(name, root)
    vectors = {}
    for split in splits:
        for i, s in enumerate(iter_samples(info.shards(split))):
            vectors[_pixels(s.image).numpy().tobytes()] = vector(i, s)
    return LookupClip(vectors, text_index, dim, **kw)


def one_hot(i: int, dim: int) -> Tensor:
    return nn.functional.one_hot(torch.tensor(i), dim).float()


def perfect_classifier(root, name: str, classnames: Sequence[str], splits=("test",), **kw) -> LookupClip:
    n = len(classnames)
    return lookup_model(
        root, name, lambda i, s: one_hot(s.label, n), class_index(classnames), n, splits, **kw
    )
