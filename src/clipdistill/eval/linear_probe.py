"""Linear probe on frozen image embeddings (issue "evaluation protocols"; docs/methods.md section 10; the protocol
of CLIP_benchmark's `linear_probe` task and the CLIP paper, appendix A.3).

Features are the model's L2-normalised image embeddings. A multinomial logistic regression (sklearn,
L-BFGS) is fitted on the train split: its inverse regularisation C is chosen on a stratified held-out
part of train (`val_fraction`, seeded) by a coarse log-grid sweep followed by a half-decade refinement
around the best value, then the probe is refitted on all of train with that C and scored on the test
split: `acc1`, `acc5` (at least 5 classes) and `mean_per_class_recall`, in [0, 1].

CLIP_benchmark trains a torch linear layer with a weight-decay search on the same kind of held-out
split; the CLIP paper (and this module) uses logistic regression with a C sweep. The difference is
the optimiser of the same convex problem, not the protocol.

Everything here is a pure function of feature tensors; the runner extracts (and caches) the features.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clipdistill.errors import UserError
from clipdistill.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    """val_fraction: share of train held out to choose C. c_grid: the coarse sweep (log-spaced);
    refine: also try C x 10^-0.5 and C x 10^0.5 around the best grid value. threads: BLAS/OpenMP
    threads for the fits."""

    val_fraction: float = 0.2
    c_grid: tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
    refine: bool = True
    max_iter: int = 1000
    seed: int = 0
    threads: int = 1


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    c: float
    val_acc1: float
    n_train: int
    n_test: int
    val_scores: dict[float, float] = field(default_factory=dict)

    def extras(self) -> dict:
        """What the JSON record keeps beside the metrics."""
        return {
            "C": self.c,
            "val_acc1": self.val_acc1,
            "train_samples": self.n_train,
            "val_scores": {f"{c:g}": s for c, s in sorted(self.val_scores.items())},
        }


def _as_numpy(x: Tensor) -> np.ndarray:
    return F.normalize(torch.as_tensor(x).float(), dim=-1).numpy()


def holdout_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): stratified when every class has at least 2 samples and the
    validation part can hold every class, else a plain seeded shuffle."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    idx = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    n_val = int(round(len(labels) * val_fraction))
    stratify = labels if counts.min() >= 2 and len(counts) <= n_val <= len(labels) - len(counts) else None
    fit, val = train_test_split(idx, test_size=max(n_val, 1), random_state=seed, stratify=stratify)
    return np.sort(fit), np.sort(val)


def fit_probe(
    x: np.ndarray, y: np.ndarray, c: float, *, max_iter: int = 1000, seed: int = 0, threads: int = 1
):
    """A fitted multinomial `sklearn.linear_model.LogisticRegression` with inverse regularisation `c`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    # Capped BLAS/OpenMP threads: on a shared CPU, spinning worker threads made each L-BFGS step ~50x
    # slower (measured: 62 ms vs 1.2 ms per iteration, 400 x 256 features, 2 busy cores).
    with warnings.catch_warnings(), threadpool_limits(threads):
        # Weakly regularised fits of separable features stop at max_iter; the held-out score judges them.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def select_c(
    x: np.ndarray, y: np.ndarray, config: ProbeConfig = ProbeConfig()
) -> tuple[float, dict[float, float]]:
    """The C with the best held-out accuracy (the smallest such C on ties: the simplest probe), and
    every tried C's held-out accuracy."""
    fit, val = holdout_split(y, config.val_fraction, config.seed)
    if len(np.unique(y[fit])) < 2:
        raise UserError(
            "the linear probe's training part holds fewer than 2 classes; evaluate on more train samples"
        )
    scores: dict[float, float] = {}

    def score(c: float) -> None:
        clf = fit_probe(x[fit], y[fit], c, max_iter=config.max_iter, seed=config.seed, threads=config.threads)
        scores[c] = float((clf.predict(x[val]) == y[val]).mean())
        log.debug("linear probe C=%g: held-out acc1 %.4f (%s iterations)", c, scores[c], clf.n_iter_)

    for c in config.c_grid:
        score(c)
    if config.refine:
        best = max(sorted(scores), key=lambda c: scores[c])
        for c in (best * 10**-0.5, best * 10**0.5):
            score(c)
    best = max(sorted(scores), key=lambda c: scores[c])
    return best, scores


def probe_logits(clf, x: np.ndarray, n_classes: int) -> Tensor:
    """N x n_classes decision scores; classes absent from the probe's training data score -inf."""
    scores = np.asarray(clf.decision_function(x), dtype=np.float64)
    if scores.ndim == 1:  # sklearn's binary case returns the score of classes_[1] only
        scores = np.stack([-scores, scores], axis=1)
    logits = torch.full((len(x), n_classes), float("-inf"), dtype=torch.float64)
    logits[:, torch.as_tensor(clf.classes_, dtype=torch.long)] = torch.from_numpy(scores)
    return logits


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    n_classes: int | None = None,
    config: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Choose C on held-out train, refit on all train, score on test (see module docstring).

    train_x N x d and test_x M x d image embeddings (normalised here), integer labels.
    """
    xtr, xte = _as_numpy(train_x), _as_numpy(test_x)
    ytr, yte = torch.as_tensor(train_y).long().numpy(), torch.as_tensor(test_y).long()
    if len(ytr) == 0 or len(yte) == 0:
        raise UserError("the linear probe needs train and test samples; check the splits and --every")
    n_classes = n_classes or int(max(ytr.max(), int(yte.max())) + 1)
    c, scores = select_c(xtr, ytr, config)
    clf = fit_probe(xtr, ytr, c, max_iter=config.max_iter, seed=config.seed, threads=config.threads)
    metrics = classification_metrics(probe_logits(clf, xte, n_classes), yte)
    return ProbeResult(metrics, c, scores[c], n_train=len(ytr), n_test=len(yte), val_scores=scores)
