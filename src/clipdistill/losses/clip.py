"""The CLIP task loss and plain logit knowledge distillation (docs/methods.md section 1).

Symbols as in docs/methods.md: `v_s`, `t_s` (N x d_s) the student's raw image and text embeddings, `s` its
scale; `v_t`, `t_t` (N x d_t) and `s_t` the teacher's. `Z_s = s v^_s t^_s^T`, `Z_t = s_t v^_t t^_t^T`
(N x N, rows images, columns texts). The distributions are over batch items, so student and teacher
widths may differ without a projector.
"""

from __future__ import annotations

from torch import Tensor

from clipdistill.errors import UserError
from clipdistill.losses._functional import contrastive_ce, cosine_logits, soft_ce, symmetric_kl
from clipdistill.losses.base import Outputs, Term, TermContext, register_term


def student_logits(student: Outputs) -> Tensor:
    """`Z_s = s v^_s t^_s^T` (N x N) on the student's own, unprojected embeddings."""
    return cosine_logits(student.image, student.text, student.scale)


def teacher_logits(teacher: Outputs, scale: float | None = None) -> Tensor:
    """`Z_t = s_t v^_t t^_t^T` (N x N), detached; `scale` replaces the teacher's own `s_t`."""
    s_t = teacher.scale if scale is None else scale
    return cosine_logits(teacher.image, teacher.text, s_t).detach()


def positive(term: str, option: str, value: object) -> float:
    value = float(value)
    if not value > 0:
        raise UserError(f"losses.{term}.{option} = {value} must be > 0")
    return value


@register_term
class ClipTask(Term):
    """CLIP's symmetric InfoNCE task loss (Radford et al. 2021; docs/methods.md section 1).

        L = ( CE(Z_s, I) + CE(Z_s^T, I) ) / 2,    Z_s = s v^_s t^_s^T

    Inputs: `student.image`, `student.text` (N x d_s, raw), `student.scale` (0-dim). An image-only
    student that uses the teacher's frozen text tower passes the teacher's text embedding as
    `student.text` (LiT-style). No teacher, no options, no `faithful` variant. Not minimised by any
    finite student (InfoNCE keeps falling as pairs separate), so there is no teacher invariant.
    """

    name = "clip"
    needs = frozenset()
    default_weight = 1.0
    source = "CLIP (Radford et al., 2021); docs/methods.md section 1"

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        return {self.name: contrastive_ce(student_logits(student))}


@register_term
class LogitKD(Term):
    """Hinton KD on the CLIP logits, both directions (Hinton et al. 2015; docs/methods.md section 1).

    Clean (default), with temperature T (option `temperature`, default 1):

        L = T^2 ( KL(softmax(Z_t/T) || softmax(Z_s/T)) + KL(softmax(Z_t^T/T) || softmax(Z_s^T/T)) ) / 2

    batchmean KL. `faithful: true` reports open_clip's `DistillClipLoss` / MobileCLIP value, the soft
    cross-entropy `T^2 ( H(softmax(Z_t/T), softmax(Z_s/T)) + H(.^T, .^T) ) / 2`, which exceeds the KL
    by the (constant) teacher entropy; the gradients are identical. At T = 1 it is exactly open_clip's.
    Option `teacher_scale` fixes `s_t` (MobileCLIP: 100; default: the teacher's own scale).

    Inputs: `student.image`, `student.text` (N x d_s), `student.scale`; `teacher.image`,
    `teacher.text` (N x d_t), `teacher.scale`. Returns `kd`, `kd/i2t`, `kd/t2i` (the latter two
    without T^2). Invariant (clean): L = 0 when the student reproduces the teacher's logits, its minimum.
    """

    name = "kd"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = "Hinton et al. 2015; open_clip DistillClipLoss; MobileCLIP; docs/methods.md section 1"
    options = {"temperature": 1.0, "teacher_scale": None, "faithful": False}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self.temperature = positive(self.name, "temperature", self.opts["temperature"])
        ts = self.opts["teacher_scale"]
        self.teacher_scale = None if ts is None else positive(self.name, "teacher_scale", ts)

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        z_s, z_t, temp = (
            student_logits(student),
            teacher_logits(teacher, self.teacher_scale),
            self.temperature,
        )
        if self.faithful:
            i2t, t2i = soft_ce(z_t, z_s, temp), soft_ce(z_t.t(), z_s.t(), temp)
        else:
            i2t, t2i = symmetric_kl(z_t, z_s, temp)
        loss = temp * temp * (i2t + t2i) / 2
        return {self.name: loss, f"{self.name}/i2t": i2t, f"{self.name}/t2i": t2i}
