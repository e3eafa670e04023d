"""The sigmoid (SigLIP) task loss and sigmoid logit distillation (docs/methods.md section 14).

Paper: Zhai, Mustafa, Kolesnikov and Beyer, "Sigmoid Loss for Language Image Pre-Training", ICCV 2023
(arXiv 2303.15343); code: open_clip `src/open_clip/loss.py` (`SigLipLoss`), big_vision `siglip.py`.

Symbols as in docs/methods.md: `x_i = v^_i`, `y_j = t^_j` the normalised image and text embeddings of a
model, `t` its scale (`Outputs.scale`) and `b` its logit bias (`Outputs.bias`); the pair logit is
`l_ij = t x_i.y_j + b` (N x N, rows images, columns texts) and `z_ij = +1` for a matched pair (i = j),
`-1` otherwise. Every pair is its own binary problem, so, unlike the softmax terms, the bias matters:
it sets where a logit turns into "matched".

Distributed form: the `Distiller` all-gathers both modalities once (the local slice keeps its gradient,
docs/methods.md section 0), and each rank computes the full N x N sum. That is the one-process loss on
the concatenated batch, on every rank. open_clip's `SigLipLoss` instead passes text chunks between
neighbouring ranks (or all-gathers them) and sums only its local image rows, normalised by the local
batch n: its per-rank value `L_r` has mean over ranks `sum_r L_r / w = sum_all / N`, our value. The
neighbour exchange saves the N x N memory on each rank, which batches here do not need; it also sends
gradient back to the other ranks' text features, so after DDP's averaging open_clip's encoders get the
full-batch gradient where ours get 1/world_size of it (as for `clip`; the Distiller's docstring).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.losses._functional import cosine_logits
from clipdistill.losses.base import Outputs, Term, TermContext, register_term

log = logging.getLogger(__name__)

INIT_BIAS = -10.0  # SigLIP's initial bias (paper section 3.2; open_clip `init_logit_bias` in its configs)
_SHARED_BIAS = "_sigmoid_student_bias"  # key of the shared fallback bias in the TermContext


def pair_signs(logits: Tensor) -> Tensor:
    """`z`: +1 on the diagonal (matched pairs), -1 elsewhere, shaped and typed like the square `logits`."""
    n = logits.shape[0]
    return 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1


def sigmoid_logits(out: Outputs, bias: Tensor | float, who: str) -> Tensor:
    """`l = t x y^T + b` (N x N) from `out`'s image and text embeddings and scale, with the given bias."""
    if out.image is None or out.text is None:
        raise UserError(f"{who} needs image and text embeddings; one of them is missing")
    if out.image.shape[0] != out.text.shape[0]:
        raise UserError(
            f"{who} needs matched image-text pairs; got {out.image.shape[0]} images and {out.text.shape[0]} texts"
        )
    if isinstance(bias, Tensor) and bias.numel() != 1:
        raise UserError(f"{who}: the logit bias must be a single number, got shape {tuple(bias.shape)}")
    if isinstance(bias, Tensor):
        bias = bias.reshape(())
    return cosine_logits(out.image, out.text, out.scale) + bias


class _SigmoidTerm(Term):
    """Base of the sigmoid terms: the student's bias, or one learnable fallback shared by both terms.

    A student without a bias gets one learnable bias (init -10) for the whole run: the first sigmoid
    term built owns it (a parameter of that term, saved with the Distiller), the other borrows it
    through the shared `TermContext`, as ComKD's terms share their EduAttention.
    """

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        store = vars(ctx)
        shared = store.get(_SHARED_BIAS)
        if shared is None:
            self.logit_bias = nn.Parameter(torch.tensor(INIT_BIAS))
            store[_SHARED_BIAS] = self.logit_bias
            self._borrowed: dict[str, nn.Parameter] = {}
        else:
            self._borrowed = {"logit_bias": shared}

    def student_bias(self, student: Outputs) -> Tensor:
        """`student.bias`, or the shared learnable fallback for a student without one."""
        if student.bias is not None:
            return student.bias
        return self._borrowed.get("logit_bias", getattr(self, "logit_bias", None))


@register_term
class SiglipTask(_SigmoidTerm):
    """SigLIP's pairwise sigmoid task loss (Zhai et al. 2023; open_clip `SigLipLoss`; docs/methods.md section 14).

        L = -(1/N) sum_{i,j} log sigmoid( z_ij (t x_i.y_j + b) ),   z_ii = +1, z_ij = -1 (i != j)

    over all N^2 pairs, divided by N as open_clip and big_vision do. `t` is the student's scale and
    receives gradient, as its bias does. Logged besides: `siglip/pos` (the N matched pairs' part) and
    `siglip/neg` (the N^2 - N others'); they sum to `siglip`.

    A student without a bias (`student.bias` None, every softmax student preset) uses a learnable
    bias owned by the loss, `logit_bias`, initialised at -10 as SigLIP's, shared with `sigmoid_kd`.
    Chosen over a fixed -10: SigLIP learns b, and no fixed value suits every scale and batch size (the
    bias balances N positives against N^2 - N negatives). The parameter lives in the Distiller
    (optimiser group "distiller", saved with it); a constant shift of every logit changes no ranking,
    so the exported student's zero-shot and retrieval results do not depend on it. The scale is the
    student's own (the presets start at 1/0.07, SigLIP at 10). A student with a bias uses its own and
    leaves `logit_bias` without gradient.

    Inputs: `student.image`, `student.text` (N x d_s, raw), `student.scale` (0-dim), `student.bias`
    (0-dim or None). No teacher, no options. The distributed form is the module docstring's.
    """

    name = "siglip"
    needs = frozenset()
    default_weight = 1.0
    source = "SigLIP (Zhai et al., ICCV 2023); open_clip SigLipLoss; docs/methods.md section 14"

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        logits = sigmoid_logits(student, self.student_bias(student), f"term '{self.name}'")
        nll = -F.logsigmoid(pair_signs(logits) * logits)
        n = logits.shape[0]
        pos = nll.diagonal().sum() / n
        neg = (nll.sum() - nll.diagonal().sum()) / n
        return {self.name: nll.sum() / n, f"{self.name}/pos": pos, f"{self.name}/neg": neg}


@register_term
class SigmoidKD(_SigmoidTerm):
    """Sigmoid logit distillation: per-pair binary cross-entropy to the teacher's sigmoid probabilities
    (docs/methods.md section 14; the sigmoid counterpart of `kd`, on SigLIP's pair logits, Zhai et al. 2023).

        p_ij = sigmoid(t_T x^T_i.y^T_j + b_T),   q_ij = sigmoid(t_S x^S_i.y^S_j + b_S)
        L = -(1/N^2) sum_{i,j} [ p_ij log q_ij + (1 - p_ij) log(1 - q_ij) ]

    the mean over all N^2 pairs (diagonal included). Minimal, with zero gradient, exactly when the
    student's pair logits equal the teacher's (q = p); its value there is the teacher's mean binary
    entropy, a constant, so `sigmoid_kd/kl` (L minus that entropy, the mean binary KL(p || q)) is
    logged too and is 0 at the teacher. Each model uses its own scale and bias; widths may differ (the
    logits are cosines, no projector). A student without a bias uses the learnable fallback that
    `siglip` describes (one parameter shared by both terms, init -10).

    Teacher bias: `teacher.bias`, or option `teacher_bias` (a number) which replaces it. A teacher
    without one (a softmax CLIP teacher: nothing calibrates its logits as probabilities) is read as
    b_T = 0 and a warning says so, once; for a softmax teacher use `kd`, or set `teacher_bias`.

    Inputs: `student.image`, `student.text` (N x d_s), `student.scale`, `student.bias` (or None);
    `teacher.image`, `teacher.text` (N x d_t), `teacher.scale`, `teacher.bias` (or None), detached.
    Returns `sigmoid_kd` and `sigmoid_kd/kl`. Distributed: as `siglip` (module docstring).
    """

    name = "sigmoid_kd"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = "Sigmoid KD on SigLIP logits (Zhai et al., ICCV 2023); docs/methods.md section 14"
    options = {"teacher_bias": None}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        tb = self.opts["teacher_bias"]
        if tb is not None and (
            isinstance(tb, bool) or not isinstance(tb, (int, float)) or not math.isfinite(float(tb))
        ):
            raise UserError(
                f"losses.{self.name}.teacher_bias = {tb!r} must be a finite number (or left out: the teacher's own)"
            )
        self.teacher_bias = None if tb is None else float(tb)
        self._warned = False

    def _teacher_bias(self, teacher: Outputs) -> Tensor | float:
        if self.teacher_bias is not None:
            return self.teacher_bias
        if teacher.bias is not None:
            return teacher.bias.detach()
        if not self._warned:
            log.warning(
                "term '%s': the teacher has no logit bias (a softmax model?); using b_T = 0. For a softmax "
                "teacher use kd, or set losses.%s.teacher_bias",
                self.name,
                self.name,
            )
            self._warned = True
        return 0.0

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        who = f"term '{self.name}'"
        z_t = sigmoid_logits(teacher, self._teacher_bias(teacher), f"{who} (teacher)").detach()
        z_s = sigmoid_logits(student, self.student_bias(student), who)
        if z_s.shape != z_t.shape:
            raise UserError(f"{who}: student and teacher batches differ ({z_s.shape[0]} vs {z_t.shape[0]})")
        p = torch.sigmoid(z_t).to(z_s.dtype)
        bce = F.binary_cross_entropy_with_logits(z_s, p)
        entropy = F.binary_cross_entropy_with_logits(z_t.to(z_s.dtype), p)
        return {self.name: bce, f"{self.name}/kl": bce - entropy.detach()}
