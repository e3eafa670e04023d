"""Zero-shot classification with template ensembling (docs/methods.md section 10; CLIP_benchmark's
`clip_benchmark/metrics/zeroshot_classification.py`).

Class embeddings: for each class, encode every template filled with the class name, normalise each,
average, normalise again. Logits: normalised image embedding x class matrix (cosine similarity; the
logit scale changes no ranking, so it is left out). Metrics `acc1`, `acc5` (when there are at least 5
classes, as CLIP_benchmark), `mean_per_class_recall` (sklearn's `balanced_accuracy_score`: mean over
the classes present in the targets of per-class top-1 recall), all in [0, 1].

The metric functions are pure functions of tensors; `class_embeddings`, `image_batches` and
`zeroshot_classification` run a `ClipModel`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from clipdistill.data.shards import Sample, batched
from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure functions of embeddings


def class_matrix(prompt_embeddings: Tensor) -> Tensor:
    """C x T x d raw prompt embeddings (class x template) -> C x d ensembled class embeddings:
    normalise each prompt embedding, average over templates, normalise again."""
    if prompt_embeddings.dim() != 3:
        raise ValueError(f"expected C x T x d prompt embeddings, got shape {tuple(prompt_embeddings.shape)}")
    return F.normalize(F.normalize(prompt_embeddings, dim=-1).mean(dim=1), dim=-1)


def zeroshot_logits(image_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """N x C cosine similarities between (re-normalised) images N x d and classes C x d."""
    return F.normalize(image_embeddings, dim=-1) @ F.normalize(class_embeddings, dim=-1).T


def topk_accuracy(logits: Tensor, targets: Tensor, k: int) -> float:
    """Fraction of rows whose target is among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets.view(-1, 1)).any(dim=1).float().mean().item()


def mean_per_class_recall(predictions: Tensor, targets: Tensor) -> float:
    """Mean over the classes present in `targets` of the fraction of that class predicted correctly."""
    recalls = [(predictions[targets == c] == c).float().mean() for c in targets.unique()]
    return torch.stack(recalls).mean().item()


def classification_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """CLIP_benchmark's classification metrics of N x C `logits` against N integer `targets`."""
    if len(targets) == 0:
        raise ValueError("no samples to score")
    targets = targets.to(logits.device).long()
    metrics = {"acc1": topk_accuracy(logits, targets, 1)}
    if logits.shape[1] >= 5:  # CLIP_benchmark leaves acc5 out (NaN) below 5 classes
        metrics["acc5"] = topk_accuracy(logits, targets, 5)
    metrics["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), targets)
    return metrics


# ---------------------------------------------------------------- running a model


@contextlib.contextmanager
def evaluating(model: ClipModel) -> Iterator[ClipModel]:
    """Eval mode and no gradients for the duration; the model's train/eval state is restored after
    (the training loop evaluates its student in the middle of training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts in class-major order: all templates of class 0, then class 1, ..."""
    if not templates:
        raise UserError(
            "no zero-shot templates; add lines with '{c}' to zeroshot_classification_templates.txt"
        )
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(
            f"template '{bad[0]}' has no '{{c}}' placeholder; fix zeroshot_classification_templates.txt"
        )
    # str.replace, not str.format: a template with other braces must not break the ensemble.
    return [t.replace("{c}", c) for c in classnames for t in templates]


def encode_texts(
    model: ClipModel,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "texts",
) -> Tensor:
    """Normalised text embeddings (len(texts) x d, float32 on the CPU), in batches."""
    out = []
    with evaluating(model), tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for chunk in batched(texts, batch_size):
            tokens = model.tokenize(list(chunk)).to(model.device)
            out.append(model.encode_text(tokens, normalize=True).float().cpu())
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.empty(0, model.embed_dim)


def class_embeddings(
    model: ClipModel,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """C x d ensembled, normalised class embeddings of `model` (see `class_matrix`)."""
    prompts = fill_templates(classnames, templates)
    emb = encode_texts(model, prompts, batch_size=batch_size, progress=progress, desc="class prompts")
    return class_matrix(emb.view(len(classnames), len(templates), -1))


def image_batches(
    model: ClipModel,
    samples: Iterable[Sample],
    *,
    batch_size: int = 64,
    progress: bool = False,
    total: int | None = None,
    desc: str = "images",
) -> Iterator[tuple[list[Sample], Tensor]]:
    """(samples, normalised image embeddings as float32 on the CPU) per batch, preprocessed with the
    model's own transform."""
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batched(samples, batch_size):
            pixels = torch.stack([model.preprocess(s.image) for s in batch])
            # Entered per batch, not around the loop: a generator must not leave no_grad and eval mode
            # switched on in its caller while it is suspended at `yield`.
            with evaluating(model):
                emb = model.encode_image(pixels.to(model.device), normalize=True).float().cpu()
            bar.update(len(batch))
            yield batch, emb


def encode_labelled_images(
    model: ClipModel,
    samples: Iterable[Sample],
    *,
    batch_size: int = 64,
    progress: bool = False,
    total: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(N x d normalised image embeddings, N labels) of labelled samples."""
    embs, labels = [], []
    for batch, emb in image_batches(model, samples, batch_size=batch_size, progress=progress, total=total):
        embs.append(emb)
        labels.extend(int(s.label) for s in batch)
    if not embs:
        return torch.empty(0, model.embed_dim), torch.empty(0, dtype=torch.long)
    return torch.cat(embs), torch.tensor(labels, dtype=torch.long)


def zeroshot_classification(
    model: ClipModel,
    samples: Iterable[Sample],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 64,
    class_emb: Tensor | None = None,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """Zero-shot `acc1`, `acc5`, `mean_per_class_recall` of `model` on labelled `samples`.

    class_emb: precomputed `class_embeddings(model, classnames, templates)` (e.g. from a cache).
    """
    if class_emb is None:
        class_emb = class_embeddings(model, classnames, templates, progress=progress)
    images, labels = encode_labelled_images(
        model, samples, batch_size=batch_size, progress=progress, total=total
    )
    if len(labels) == 0:
        raise UserError("no readable samples to evaluate; check the dataset's shards (see the skipped count)")
    return classification_metrics(zeroshot_logits(images, class_emb), labels)
