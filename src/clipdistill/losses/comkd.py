"""ComKD-CLIP: image feature alignment, EduAttention and distilled-knowledge refinement (docs/methods.md section 5).

Paper: Chen et al., 2024, "ComKD-CLIP: Comprehensive Knowledge Distillation for Contrastive
Language-Image Pre-training Model". No official code is public; the formulas follow the paper's text
as docs/methods.md section 5 reads it (base framework: PromptKD, zhengli97/PromptKD).

Setting: a light student image tower whose image feature `u_s` (N x d_s) is mapped by the
Distiller's shared image projector `P` to the teacher width d_t (identity when d_s == d_t); the
candidate texts are the teacher's text features `w_t` (N x d_t, the batch's captions; class prompts
in the paper's PromptKD setting). Teacher image features `u_t` (N x d_t).

Sharing EduAttention (design decision). `comkd_kl` needs the fused feature
`f_e = P(u_s) + alpha f_att` that EduAttention computes, and the term `eduattention` trains the same
module with the student's own task loss. Terms only see (student, teacher), so both terms take the
one `EduAttention` instance from their `TermContext`: the first term built creates it and registers
it as its submodule (so it is saved, trained and put in that term's parameter group once); a later
term holds an unregistered reference to it. With only one of the two terms configured, that term
owns the module. This relies on the Distiller passing one `TermContext` to every term; with separate
contexts each term would get its own module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.losses._functional import contrastive_ce, kl_rows
from clipdistill.losses.base import Outputs, Term, TermContext, register_term

_SHARED_KEY = "_comkd_eduattention"


def _maybe_project(proj: nn.Module | None, x: Tensor) -> Tensor:
    return proj(x) if proj is not None else x


class EduAttention(nn.Module):
    """EduAttention (docs/methods.md section 5): the student image feature attends over the candidate text features.

        f_att = softmax( FC_q(u_s) FC_k(w^_t)^T / divisor ) FC_v(w^_t),    divisor = sqrt(C) by default
        f_e   = P(u_s) + alpha * f_att,                                   alpha learnable, init 0

    FC_q: d_s -> C, FC_k: d_t -> C, FC_v: d_t -> d_t, all with bias; C = `attn_dim` (default d_t).
    Decision (docs/methods.md section 13, item 3): keys and values are the L2-normalised text
    features, as zero-shot class embeddings are at inference, so training and deployment see the
    same scale. The paper writes the divisor as a hyper-parameter C; we default to sqrt(C) (scaled
    dot-product attention) and expose it.
    Shapes: u_s (N x d_s), u_s_proj = P(u_s) (N x d_t), w_t (M x d_t) -> f_e (N x d_t).
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, attn_dim: int | None = None, divisor: float | None = None
    ):
        super().__init__()
        self.attn_dim = int(attn_dim or teacher_dim)
        self.divisor = float(divisor) if divisor is not None else math.sqrt(self.attn_dim)
        self.fc_q = nn.Linear(student_dim, self.attn_dim)
        self.fc_k = nn.Linear(teacher_dim, self.attn_dim)
        self.fc_v = nn.Linear(teacher_dim, teacher_dim)
        self.alpha = nn.Parameter(torch.zeros(()))

    def attend(self, u_s: Tensor, w_t: Tensor) -> Tensor:
        w = F.normalize(w_t, dim=-1)
        weights = torch.softmax(self.fc_q(u_s) @ self.fc_k(w).t() / self.divisor, dim=-1)
        return weights @ self.fc_v(w)

    def forward(self, u_s: Tensor, u_s_proj: Tensor, w_t: Tensor) -> Tensor:
        return u_s_proj + self.alpha * self.attend(u_s, w_t)


class _FusedTerm(Term):
    """Base of the two terms that use the shared EduAttention and the fused student logits."""

    options = {"attn_dim": None, "divisor": None}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self._proj = {"image": ctx.projector("image")}
        store = vars(ctx)
        edu = store.get(_SHARED_KEY)
        if edu is None:
            edu = EduAttention(ctx.student_dim, ctx.teacher_dim, self.opts["attn_dim"], self.opts["divisor"])
            store[_SHARED_KEY] = edu
            self.eduattention = edu
            self._borrowed: dict[str, EduAttention] = {}
        else:
            attn_dim = int(self.opts["attn_dim"] or ctx.teacher_dim)
            divisor = float(self.opts["divisor"]) if self.opts["divisor"] is not None else math.sqrt(attn_dim)
            if (attn_dim, divisor) != (edu.attn_dim, edu.divisor):
                raise UserError(
                    f"terms 'eduattention' and 'comkd_kl' share one EduAttention but their attn_dim/divisor "
                    f"differ ({edu.attn_dim}, {edu.divisor:g} vs {attn_dim}, {divisor:g}); set the same values on both"
                )
            self._borrowed = {"edu": edu}

    @property
    def edu(self) -> EduAttention:
        return self._borrowed["edu"] if self._borrowed else self.eduattention

    def fused(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        """(normalised fused feature f^_e, normalised candidate texts w^_t)."""
        w_t = teacher.text_n.detach()
        u_s = student.image
        f_e = self.edu(u_s, _maybe_project(self._proj["image"], u_s), w_t)
        return F.normalize(f_e, dim=-1), w_t


@register_term
class IFAlign(Term):
    """ComKD-CLIP image feature alignment (docs/methods.md section 5, `ifalign`): match the first two batch moments.

        mu_s = mean_i P(u_s)_i,  var_s = var_i P(u_s)_i  (per dimension, over the batch, biased); same for u_t
        L_align = ( ||mu_s - mu_t||_1 + ||var_s - var_t||_1 ) / d_t

    Inputs: `student.image` u_s (N x d_s, raw), `teacher.image` u_t (N x d_t, raw). Decision (docs/methods.md section 5):
    the paper does not fix the axis of mu and sigma^2; per-dimension batch statistics is the reading
    that makes "align the feature distribution" non-trivial. No `faithful` variant.
    Invariant: P(u_s) = u_t gives L = 0, its minimum.
    """

    name = "ifalign"
    needs = frozenset({"teacher"})
    unpaired = "images"
    default_weight = 1.0
    source = "ComKD-CLIP (Chen et al., 2024); docs/methods.md section 5"

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self._proj = {"image": ctx.projector("image")}

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        u_s = _maybe_project(self._proj["image"], student.image)
        u_t = teacher.image.detach()
        d = u_t.shape[-1]
        l_mean = (u_s.mean(0) - u_t.mean(0)).abs().sum() / d
        l_var = (u_s.var(0, unbiased=False) - u_t.var(0, unbiased=False)).abs().sum() / d
        return {self.name: l_mean + l_var, f"{self.name}/mean": l_mean, f"{self.name}/var": l_var}


@register_term
class EduAttentionTask(_FusedTerm):
    """ComKD-CLIP EduAttention (docs/methods.md section 5, `eduattention`): the student's task loss on its fused logits.

    A ComKD student has no text tower: its logits are `Z = s f^_e w^_t^T` (f_e from `EduAttention`,
    w_t the teacher's text features of the batch captions), so its task loss with paired captions
    (the term docs/methods.md section 5 adds to the paper's total when captions are paired) is

        L = ( CE(Z, I) + CE(Z^T, I) ) / 2

    This term owns (or shares with `comkd_kl`, see the module docstring) the EduAttention module
    and trains it; `comkd_kl` alone also trains it through the KL. Options: `attn_dim` (C, default
    d_t), `divisor` (default sqrt(C)). Inputs: `student.image` (N x d_s), `student.scale`,
    `teacher.text` (N x d_t). No minimum-at-teacher invariant (an InfoNCE).
    """

    name = "eduattention"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = "ComKD-CLIP (Chen et al., 2024); docs/methods.md section 5"

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        f_e, w_t = self.fused(student, teacher)
        loss = contrastive_ce(student.scale * f_e @ w_t.t())
        return {self.name: loss, f"{self.name}/alpha": self.edu.alpha.detach()}


@register_term
class ComKDKL(_FusedTerm):
    """ComKD-CLIP distilled knowledge refinement (docs/methods.md section 5, `comkd_kl`).

        q_t = s_t u^_t w^_t^T,   q_s = s f^_e w^_t^T,   L_kl = T^2 KL(softmax(q_t / T) || softmax(q_s / T))

    batchmean KL over the N candidate texts, T = `temperature` (default 1). f_e = P(u_s) + alpha f_att
    from the shared `EduAttention` (module docstring). Inputs: `student.image` (N x d_s),
    `student.scale`, `teacher.image`, `teacher.text` (N x d_t), `teacher.scale`.
    Invariant: with alpha = 0, P the identity, u_s = u_t and s = s_t, L = 0, its minimum.
    """

    name = "comkd_kl"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = "ComKD-CLIP (Chen et al., 2024); docs/methods.md section 5"
    options = {**_FusedTerm.options, "temperature": 1.0}

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        f_e, w_t = self.fused(student, teacher)
        temp = float(self.opts["temperature"])
        q_t = (teacher.scale * teacher.image_n @ w_t.t()).detach()
        q_s = student.scale * f_e @ w_t.t()
        loss = temp * temp * kl_rows(q_t, q_s, temp)
        return {self.name: loss, f"{self.name}/alpha": self.edu.alpha.detach()}
