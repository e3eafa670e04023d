"""Distillation from a teacher ensemble, as MobileCLIP does it (docs/methods.md section 7.1).

Vasu et al., "MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training", CVPR 2024
(code apple/ml-mobileclip). Its teacher is an ensemble of two CLIP models, and its distillation loss
averages the members' similarity distributions after the softmax, each member with its own embeddings.

An ensemble teacher's `Outputs` carry `members`, one `Outputs` per member: its normalised embeddings
`v^_k`, `t^_k` (N x d_k; the widths d_k may differ from each other and from the student's) and its
scale `s_k`. The teacher's own fields are one chosen member's (`teacher.member`, default 0), so every
other term (kd, fd, crd, icl, ...) distils that member unchanged (docs/methods.md section 7.1 says why).
"""

from __future__ import annotations

from torch import Tensor

from clipdistill.losses._functional import mixture_kl_rows, mixture_soft_ce
from clipdistill.losses.base import Outputs, register_term
from clipdistill.losses.clip import LogitKD, student_logits, teacher_logits


@register_term
class EnsembleKD(LogitKD):
    """KD from the mean of the members' softmax distributions, both directions (MobileCLIP, Vasu et al.
    2024, multi-modal reinforced training; docs/methods.md section 7.1).

    For members k = 1..K with logits `Z_k = s_k v^_k t^_k^T` (N x N, rows images) and the student's
    `Z_s = s v^_s t^_s^T`, with temperature T (option `temperature`, default 1):

        P_i2t = (1/K) sum_k softmax(Z_k / T),        P_t2i = (1/K) sum_k softmax(Z_k^T / T)
        L = T^2 ( KL(P_i2t || softmax(Z_s / T)) + KL(P_t2i || softmax(Z_s^T / T)) ) / 2

    batchmean KL; each row of P is a probability distribution over the batch. `faithful: true`
    reports MobileCLIP's soft cross-entropy `T^2 ( H(P_i2t, softmax(Z_s/T)) + H(P_t2i, .) ) / 2`, which
    exceeds the KL by the mixture's entropy, a constant, so the gradients are the same. Option
    `teacher_scale` fixes every `s_k` (MobileCLIP: 100); by default each member uses its own scale.

    With one member (or a teacher without `members`, which counts as one) this is exactly `kd`. The
    minimum, 0, is reached only by a student whose row and column distributions both equal the
    mixture's; a mixture of softmaxes is not always one softmax, so the minimum may be above 0.

    Inputs: `student.image`, `student.text` (N x d_s, raw), `student.scale` (0-dim); `teacher.members`,
    each with `image`, `text` (N x d_k) and `scale` (0-dim). Returns `ensemble_kd`,
    `ensemble_kd/i2t`, `ensemble_kd/t2i` (the latter two without T^2).
    """

    name = "ensemble_kd"
    source = (
        "MobileCLIP (Vasu et al., CVPR 2024), multi-modal reinforced training; docs/methods.md section 7.1"
    )

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        members = teacher.members or (teacher,)
        z_s = student_logits(student)
        z_t = [teacher_logits(m, self.teacher_scale) for m in members]
        temp = self.temperature
        rows = mixture_soft_ce if self.faithful else mixture_kl_rows
        i2t = rows(z_t, z_s, temp)
        t2i = rows([z.t() for z in z_t], z_s.t(), temp)
        loss = temp * temp * (i2t + t2i) / 2
        return {self.name: loss, f"{self.name}/i2t": i2t, f"{self.name}/t2i": t2i}
