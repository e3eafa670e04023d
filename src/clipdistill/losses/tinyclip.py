"""TinyCLIP's affinity mimicking (docs/methods.md section 3).

Paper: Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance",
ICCV 2023; code microsoft/Cream, `TinyCLIP/src/open_clip/clip_soft_loss.py` (`ClipSoftLoss`).
Weight inheritance (manual and automatic) is model surgery, not a loss term, and lives elsewhere.
"""

from __future__ import annotations

from torch import Tensor

from clipdistill.losses._functional import soft_ce
from clipdistill.losses.base import Outputs, Term, TermContext, register_term
from clipdistill.losses.clip import positive, student_logits, teacher_logits

FAITHFUL_SCALE = 50.0


@register_term
class AffinityMimicking(Term):
    """TinyCLIP affinity mimicking (docs/methods.md section 3, `affinity`): cross-modal batch affinities, soft cross-entropy.

        A_i2t = softmax(Z),  A_t2i = softmax(Z^T)   for the teacher (Z_t) and the student (Z_s)
        L = ( CE_soft(A_t_i2t, A_s_i2t) + CE_soft(A_t_t2i, A_s_t2i) ) / 2,   CE_soft(P, Q) = -sum P log Q

    averaged over rows. Clean (default): each model's own scale, `Z_s = s v^_s t^_s^T` (gradient to
    `s`), `Z_t = s_t v^_t t^_t^T`. `faithful: true`: every released script fixes both scales at 50
    (option `scale`): the teacher's before every forward and the student's after every step, so here
    both logit matrices use 50 and the student's scale gets no gradient from this term (the engine
    must also pin the student's logit scale to reproduce the scripts); the scripts use no task loss
    (`distillation-alpha` 1, configs/tinyclip.yaml). The value exceeds the KL form (`kd`, `crd`) by
    the teacher's entropy, a constant; the gradients equal theirs.
    Inputs: `student.image`, `student.text` (N x d_s), `student.scale`; `teacher.image`,
    `teacher.text` (N x d_t), `teacher.scale`. Returns `affinity`, `affinity/i2t`, `affinity/t2i`.
    Invariant: minimal (gradient zero, value = the teacher's row entropy) when the student's
    affinities equal the teacher's.
    """

    name = "affinity"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = "TinyCLIP (Wu et al., ICCV 2023), microsoft/Cream; docs/methods.md section 3"
    options = {"faithful": False, "scale": FAITHFUL_SCALE}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self.fixed_scale = positive(self.name, "scale", self.opts["scale"])

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        if self.faithful:
            z_s = student_logits(student.replace(scale=student.scale.new_tensor(self.fixed_scale)))
            z_t = teacher_logits(teacher, self.fixed_scale)
        else:
            z_s, z_t = student_logits(student), teacher_logits(teacher)
        i2t, t2i = soft_ce(z_t, z_s), soft_ce(z_t.t(), z_s.t())
        return {self.name: (i2t + t2i) / 2, f"{self.name}/i2t": i2t, f"{self.name}/t2i": t2i}
