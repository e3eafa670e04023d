"""Zero-shot image-text retrieval (docs/methods.md section 10; CLIP_benchmark's
`clip_benchmark/metrics/zeroshot_retrieval.py`, same metric names and directions).

Score matrix: normalised images x normalised texts (every caption of every image, e.g. Flickr8k test:
1,000 images x 5,000 captions).

- `text_retrieval_recall@k` (image -> text): fraction of images with at least one of their captions
  among the k highest-scoring texts.
- `image_retrieval_recall@k` (text -> image): fraction of captions whose image is among the k
  highest-scoring images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clipdistill.data.shards import Sample
from clipdistill.errors import UserError
from clipdistill.eval.zeroshot import encode_texts, image_batches
from clipdistill.models.base import ClipModel

RECALL_KS = (1, 5, 10)
_ROWS = 1024  # score rows per chunk, so 5k x 100k problems do not need one giant matrix


def _hits_at_k(queries: Tensor, keys: Tensor, positive: Tensor, k: int) -> Tensor:
    """Per query: True when any of its positive keys is among its top-k keys.

    queries Q x d, keys K x d, positive Q x K bool.
    """
    k = min(k, keys.shape[0])
    hits = []
    for start in range(0, queries.shape[0], _ROWS):
        scores = queries[start : start + _ROWS] @ keys.T
        top = scores.topk(k, dim=1).indices
        hits.append(positive[start : start + _ROWS].gather(1, top).any(dim=1))
    return torch.cat(hits)


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image_index: Tensor | Sequence[int],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k in both directions.

    image_emb: I x d, text_emb: T x d (normalised here), text_image_index: T ints, the image of each text.
    """
    index = torch.as_tensor(text_image_index, dtype=torch.long)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if index.shape != (n_txt,) or index.min() < 0 or index.max() >= n_img:
        raise ValueError("text_image_index must give an image index in [0, I) for every text")
    images, texts = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[index, torch.arange(n_txt)] = True
    metrics = {
        f"text_retrieval_recall@{k}": _hits_at_k(images, texts, positive, k).float().mean().item() for k in ks
    }
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (
            _hits_at_k(texts, images, positive.T, k).float().mean().item()
        )
    return metrics


def encode_pairs(
    model: ClipModel,
    samples: Iterable[Sample],
    *,
    batch_size: int = 64,
    progress: bool = False,
    total: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(I x d image embeddings, T x d caption embeddings, T image indices) of captioned samples,
    all normalised; every caption of every sample."""
    images, texts, index = [], [], []
    for batch, emb in image_batches(model, samples, batch_size=batch_size, progress=progress, total=total):
        captions = [c for s in batch for c in s.captions or []]
        first = sum(e.shape[0] for e in images)
        index.extend(first + j for j, s in enumerate(batch) for _ in s.captions or [])
        images.append(emb)
        texts.append(encode_texts(model, captions, batch_size=max(batch_size, len(captions))))
    if not images:
        return (
            torch.empty(0, model.embed_dim),
            torch.empty(0, model.embed_dim),
            torch.empty(0, dtype=torch.long),
        )
    return torch.cat(images), torch.cat(texts), torch.tensor(index, dtype=torch.long)


def zeroshot_retrieval(
    model: ClipModel,
    samples: Iterable[Sample],
    *,
    batch_size: int = 64,
    ks: Sequence[int] = RECALL_KS,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """Image -> text and text -> image recall@k of `model` on captioned `samples`."""
    images, texts, index = encode_pairs(model, samples, batch_size=batch_size, progress=progress, total=total)
    if len(images) == 0:
        raise UserError("no readable samples to evaluate; check the dataset's shards (see the skipped count)")
    return retrieval_metrics(images, texts, index, ks)
