"""CLIP-CID: cluster- and instance-level distillation (docs/methods.md sections 4.2 and 4.3).

Paper: Yang, Gu et al., "CLIP-CID: Efficient CLIP Distillation via Cluster-Instance Discrimination",
AAAI 2025. No official code is public; the parts the paper leaves open follow UNICOM
(deepglint/unicom, `partial_fc.py`), as docs/methods.md section 4 decides. Data curation (section
4.1) and the k-means that produces the centres live in `clipdistill.curate`; these terms only consume
the centres.

Symbols as in docs/methods.md: `v_s` (N x d_s) the student image embedding, `v_t` (N x d_t) the teacher's,
`P` the Distiller's shared image projector d_s -> d_t (None when d_s == d_t), `W` (K x d_t) the
normalised k-means centres, `W_s` the learnable cluster classifier, `y` (N) the pseudo-labels.
The student side is `~v_s = normalize(P(v_s))`: the shared projector takes the raw embedding as in
docs/methods.md section 0 (every term that shares it feeds it the same input); the paper's notation reads
`P(v^_s)^`, the same vector whenever there is no projector (decision: docs/methods.md section 13, item 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.losses._functional import contrastive_ce, kl_rows
from clipdistill.losses.base import Outputs, Term, TermContext, register_term


def _project(proj: nn.Module | None, x: Tensor) -> Tensor:
    return F.normalize(proj(x) if proj is not None else x, dim=-1)


def load_centres(path: str | Path | None, array: object | None, dim: int) -> Tensor:
    """The K x dim k-means centres, L2-normalised, from a .npy file or an array (option `centres_array`)."""
    if array is None and path is None:
        raise UserError(
            "term 'cluster' needs k-means centres; set losses.cluster.centres to a K x D .npy file "
            "(k-means of the teacher image embeddings)"
        )
    if array is None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(
                f"cluster centres file '{path}' does not exist; set losses.cluster.centres to a K x D .npy file"
            )
        array = np.load(path)
    centres = torch.as_tensor(np.asarray(array), dtype=torch.get_default_dtype())
    if centres.ndim != 2 or centres.shape[0] < 2:
        raise UserError(
            f"cluster centres must be a K x D array with K >= 2, got shape {tuple(centres.shape)}"
        )
    if centres.shape[1] != dim:
        raise UserError(
            f"cluster centres have width {centres.shape[1]} but the teacher embeddings have {dim}; "
            "recompute the centres from this teacher's image embeddings"
        )
    return F.normalize(centres, dim=-1)


def _check_range(
    term: str, name: str, value: float, low: float, high: float, low_open: bool = False
) -> float:
    value = float(value)
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise UserError(
            f"losses.{term}.{name} = {value} is out of range; use a value in {bracket}{low}, {high}]"
        )
    return value


@register_term
class ClusterDistill(Term):
    """CLIP-CID cluster-level distillation (docs/methods.md section 4.2).

    `p_t = softmax(v^_t W^T / tau)` with the fixed centres `W`; the student's cosine classifier
    `W_s` (a learnable K x d_t matrix initialised from `W`, rows re-normalised at every call as in
    UNICOM's partial FC; docs/methods.md section 13, item 1) gives `p_s = softmax(~v_s W^_s^T / tau)`.

        L_l = CE(~v_s W^_s^T / tau, y)          (softmax classification on the pseudo-labels)
        L_d = KL(p_t || p_s)                      (batchmean, over all K centres)
        L_cluster = alpha L_l + (1 - alpha) L_d,  alpha = 0.999, tau = 0.07

    Options: `centres` (path to a K x d_t .npy) or `centres_array`; `alpha`, `tau`; `neg_ratio` in
    (0, 1]: the classification softmax uses every positive class of the batch plus random negatives
    up to `neg_ratio * K` classes (UNICOM's partial FC; 1.0 = all classes; the sample is a function
    of `seed` and the step counter so every rank draws the same classes); `margin` m >= 0: ArcFace
    margin on the positive logit, `cos(theta_y + m) / tau` (UNICOM uses s = 32, m = 0.3; here the
    scale stays 1/tau; default 0, the plain softmax of the paper's formula).

    Inputs: `student.image` (N x d_s), `teacher.image` (N x d_t), `teacher.labels` (N, long; when
    absent the pseudo-label is the nearest centre, which is how k-means labels were assigned).
    `W_s` is its own optimiser group, "cluster_classifier" (paper: lr 1e-6 against 1e-3).
    Invariant: with alpha = 0, `W_s = W` and the student equal to the teacher, L = 0 (its minimum).
    """

    name = "cluster"
    unpaired = "images"
    needs = frozenset({"teacher", "cluster_centres"})
    default_weight = 1.0
    source = "CLIP-CID (Yang, Gu et al., AAAI 2025); docs/methods.md section 4.2"
    group = "cluster_classifier"
    options = {
        "centres": None,
        "centres_array": None,
        "alpha": 0.999,
        "tau": 0.07,
        "neg_ratio": 1.0,
        "margin": 0.0,
        "seed": 0,
    }

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self.alpha = _check_range(self.name, "alpha", self.opts["alpha"], 0.0, 1.0)
        self.tau = _check_range(self.name, "tau", self.opts["tau"], 0.0, math.inf, low_open=True)
        self.neg_ratio = _check_range(self.name, "neg_ratio", self.opts["neg_ratio"], 0.0, 1.0, low_open=True)
        self.margin = _check_range(self.name, "margin", self.opts["margin"], 0.0, math.pi / 2)
        centres = load_centres(self.opts["centres"], self.opts["centres_array"], ctx.teacher_dim)
        self.register_buffer("centres", centres)
        self.classifier = nn.Parameter(centres.clone())
        # Counts update() calls, so the negative sample changes every step yet is the same on every rank.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # A plain dict, not a submodule: the Distiller owns the shared projector and its param group.
        self._proj = {"image": ctx.projector("image")}

    @property
    def num_classes(self) -> int:
        return self.centres.shape[0]

    def sampled_classes(self, labels: Tensor) -> Tensor:
        """Sorted class ids used by the classification softmax this step: all positives, then random negatives."""
        k = self.num_classes
        if self.neg_ratio >= 1.0:
            return torch.arange(k, device=labels.device)
        gen = torch.Generator().manual_seed(int(self.opts["seed"]) * 1_000_003 + int(self.step))
        priority = torch.rand(k, generator=gen)
        priority[labels.cpu()] = 2.0
        num = max(int(self.neg_ratio * k), int(torch.unique(labels).numel()))
        return torch.topk(priority, num).indices.sort().values.to(labels.device)

    def _classification(self, cos: Tensor, labels: Tensor) -> Tensor:
        if self.neg_ratio < 1.0:
            classes = self.sampled_classes(labels)
            cos = cos[:, classes]
            labels = torch.searchsorted(classes, labels)
        target = labels.unsqueeze(1)
        if self.margin > 0:
            pos = cos.gather(1, target)
            sin = (1 - pos * pos).clamp_min(1e-12).sqrt()
            cos = cos.scatter(1, target, pos * math.cos(self.margin) - sin * math.sin(self.margin))
        return F.cross_entropy(cos / self.tau, target.squeeze(1))

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        v_s = _project(self._proj["image"], student.image)
        v_t = teacher.image_n.detach()
        t_logits = v_t @ self.centres.t() / self.tau
        labels = teacher.labels if teacher.labels is not None else t_logits.argmax(-1)
        cos = v_s @ F.normalize(self.classifier, dim=-1).t()
        l_cls = self._classification(cos, labels.long().to(cos.device))
        l_kl = kl_rows(t_logits, cos / self.tau)
        loss = self.alpha * l_cls + (1 - self.alpha) * l_kl
        return {self.name: loss, f"{self.name}/cls": l_cls, f"{self.name}/kl": l_kl}

    @torch.no_grad()
    def update(self, student: Outputs, teacher: Outputs | None) -> None:
        self.step += 1


@register_term
class InstanceDistill(Term):
    """CLIP-CID instance-level distillation (docs/methods.md section 4.3): bidirectional student-teacher image InfoNCE.

        L_instance = ( CE(~v_s v^_t^T / tau, I) + CE(v^_t ~v_s^T / tau, I) ) / 2,   tau = 0.07

    Inputs: `student.image` (N x d_s), `teacher.image` (N x d_t). Default weight gamma = 0.5
    (docs/methods.md section 4.4).
    No minimum-at-teacher invariant: InfoNCE keeps decreasing as the pairs separate, so the student
    equal to the teacher is not a minimum (tests check the value and gradient instead).
    """

    name = "instance"
    unpaired = "images"
    needs = frozenset({"teacher"})
    default_weight = 0.5
    source = "CLIP-CID (Yang, Gu et al., AAAI 2025); docs/methods.md section 4.3"
    options = {"tau": 0.07}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self.tau = _check_range(self.name, "tau", self.opts["tau"], 0.0, math.inf, low_open=True)
        self._proj = {"image": ctx.projector("image")}

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        v_s = _project(self._proj["image"], student.image)
        logits = v_s @ teacher.image_n.detach().t() / self.tau
        return {self.name: contrastive_ce(logits)}
