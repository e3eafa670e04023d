"""CLIP-KD's distillation terms: crd, fd, mfd, gd, icl, afd (docs/methods.md section 2).

Paper: Yang et al., "CLIP-KD: An Empirical Study of CLIP Model Distillation", CVPR 2024; code
winycg/CLIP-KD, `src/open_clip/loss.py` (`KDClipLoss`). The published best combination is
clip + crd + icl + fd with weights 1, 1, 1, 2000 (configs/clip_kd.yaml).

Symbols as in docs/methods.md: `v_s`, `t_s` (N x d_s) the student's raw embeddings and `s` its scale;
`v_t`, `t_t` (N x d_t) the teacher's and `s_t`. `crd` uses the student's own normalised features;
`fd`, `mfd`, `gd`, `icl`, `afd` use the projected ones `~v_s = normalize(P_v(v_s))`,
`~t_s = normalize(P_t(t_s))`, where `P_v`, `P_t: Linear(d_s, d_t)` with bias are the Distiller's shared
projectors (absent when d_s == d_t, then `~v_s = v^_s`). Teacher tensors are constants.
Distributed: the code gathers without gradient and swaps the local slice back (open_clip's default);
the Distiller does the same once for every term, and unlike the code these terms also run on one process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.losses._functional import contrastive_ce, labels_like, project_normalize, symmetric_kl
from clipdistill.losses.base import Outputs, Term, TermContext, register_term
from clipdistill.losses.clip import student_logits, teacher_logits

CLIP_KD = "CLIP-KD (Yang et al., CVPR 2024), winycg/CLIP-KD"
INIT_LOGIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07; the code's 2.659
MAX_SCALE = 100.0


class LearnableScale(nn.Module):
    """A learnable logit scale for ICL and AFD.

    Clean: `s = exp(c)` clamped to at most 100 (CLIP's parameterisation). Faithful: the CLIP-KD code
    multiplies by the raw parameter, `s = c` (no exp, no clamp). Both start at c = ln(1/0.07) = 2.659,
    so the faithful initial temperature is 1/2.659 = 0.376 against the clean 0.07.
    """

    def __init__(self, faithful: bool) -> None:
        super().__init__()
        self.faithful = faithful
        self.logit = nn.Parameter(torch.tensor(INIT_LOGIT))

    def forward(self) -> Tensor:
        return self.logit if self.faithful else self.logit.exp().clamp(max=MAX_SCALE)


def random_masking(
    tokens: Tensor, mask_ratio: float, num_prefix: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """MAE-style token dropping for MFD's masked student view (docs/methods.md section 2, `mfd`).

    tokens: N x (num_prefix + L) x w (class token(s) first). Keeps the `num_prefix` tokens, then
    `keep = max(1, int(L * (1 - mask_ratio)))` patch tokens per sample: the first `keep` of an argsort
    of uniform noise (drawn on the CPU from `generator`), sorted back into ascending patch order, so
    the kept patches keep their original relative order. MAE's `random_masking` keeps them in the
    shuffled (noise) order instead, has no floor of one token, and adds the class token afterwards.
    The order does not change the output of a ViT without an attention mask whose pooling reads the
    class token or the token mean (the blocks are permutation-equivariant), beyond float rounding.
    Returns N x (num_prefix + keep) x w. The engine calls this between the patch embedding (with
    positional embedding added) and the transformer blocks of a ViT student.
    """
    n, length = tokens.shape[0], tokens.shape[1] - num_prefix
    keep = max(1, int(length * (1 - mask_ratio)))
    noise = torch.rand(n, length, generator=generator).to(tokens.device)
    ids = noise.argsort(dim=1)[:, :keep].sort(dim=1).values + num_prefix
    patches = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :num_prefix], patches], dim=1)


class _Projected(Term):
    """A CLIP-KD term that compares projected student vectors with the teacher's (docs/methods.md section 2)."""

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        # A plain dict, not submodules: the Distiller owns the shared projectors and their group.
        self._proj = {"image": ctx.projector("image"), "text": ctx.projector("text")}

    def project(self, modality: str, x: Tensor) -> Tensor:
        return project_normalize(self._proj[modality], x)


@register_term
class ContrastiveRelationalDistill(Term):
    """CLIP-KD contrastive relational distillation (`ckd` in the code; docs/methods.md section 2, `crd`).

        L = ( KL(softmax(Z_t) || softmax(Z_s)) + KL(softmax(Z_t^T) || softmax(Z_s^T)) ) / 2

    batchmean KL, T = 1; `Z_s = s v^_s t^_s^T` on the student's own unprojected features (gradient to
    `s` too), `Z_t = s_t v^_t t^_t^T` with the teacher's own scale, detached. Same form as `kd` at
    T = 1, kept under its own name because recipes and logs name it. No `faithful` variant.
    Inputs: `student.image`, `student.text` (N x d_s), `student.scale`; `teacher.image`,
    `teacher.text` (N x d_t), `teacher.scale`. Returns `crd`, `crd/i2t`, `crd/t2i`.
    Invariant: L = 0 (its minimum) when the student's logits equal the teacher's.
    """

    name = "crd"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = f"{CLIP_KD}; docs/methods.md section 2"

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        i2t, t2i = symmetric_kl(teacher_logits(teacher), student_logits(student))
        return {self.name: (i2t + t2i) / 2, f"{self.name}/i2t": i2t, f"{self.name}/t2i": t2i}


@register_term
class FeatureDistill(_Projected):
    """CLIP-KD feature distillation (docs/methods.md section 2, `fd`).

        L = MSE(~v_s, v^_t) + MSE(~t_s, t^_t)        (MSE: mean over the N x d_t elements)

    Published weight 2000. For unit vectors `MSE = (2/d_t) mean(1 - cos)`, so that weight's effect
    depends on d_t. Option `form: cosine` computes `(2/reference_dim) mean(1 - cos)` per modality
    instead (`reference_dim` default 512, CLIP-KD's teacher width): identical to the MSE at
    d_t = 512 and independent of d_t otherwise, so a recipe's weight 2000 means the same for every
    teacher (decision: docs/methods.md section 2).
    Inputs: `student.image`, `student.text` (N x d_s, raw; text may be None: image side only);
    `teacher.image`, `teacher.text` (N x d_t). Returns `fd`, `fd/image`, `fd/text`. No `faithful`
    variant. Invariant: L = 0 (its minimum) when `~v_s = v^_t` and `~t_s = t^_t`.
    """

    name = "fd"
    needs = frozenset({"teacher", "teacher_text"})
    unpaired = "images"  # the image side is defined on images alone
    default_weight = 2000.0
    source = f"{CLIP_KD}; docs/methods.md section 2"
    options = {"form": "mse", "reference_dim": 512}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        if self.opts["form"] not in ("mse", "cosine"):
            raise UserError(
                f"losses.{self.name}.form = {self.opts['form']!r} is unknown; use 'mse' or 'cosine'"
            )
        if not int(self.opts["reference_dim"]) > 0:
            raise UserError(
                f"losses.{self.name}.reference_dim = {self.opts['reference_dim']} must be a positive width"
            )

    def distance(self, s_n: Tensor, t: Tensor) -> Tensor:
        t_n = F.normalize(t, dim=-1).detach()
        if self.opts["form"] == "mse":
            return F.mse_loss(s_n, t_n)
        return (1 - (s_n * t_n).sum(-1)).mean() * 2 / int(self.opts["reference_dim"])

    def modality_losses(self, image: Tensor, student: Outputs, teacher: Outputs) -> dict[str, Tensor]:
        l_img = self.distance(self.project("image", image), teacher.image)
        if student.text is None:
            l_txt = torch.zeros((), dtype=l_img.dtype, device=l_img.device)
        else:
            l_txt = self.distance(self.project("text", student.text), teacher.text)
        return {self.name: l_img + l_txt, f"{self.name}/image": l_img, f"{self.name}/text": l_txt}

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        return self.modality_losses(student.image, student, teacher)

    def unpaired_loss(self, student_u, teacher_u, student, teacher):
        """Unpaired images: the image side (masked view for mfd); corpus texts: the text side."""
        if student_u.image is not None:
            return self(student_u, teacher_u)
        l_txt = self.distance(self.project("text", student_u.text), teacher_u.text)
        return {self.name: l_txt, f"{self.name}/text": l_txt}


@register_term
class MaskedFeatureDistill(FeatureDistill):
    """CLIP-KD masked feature distillation (docs/methods.md section 2, `mfd`): `fd` with a masked student image view.

        L = MSE(normalize(P_v(v_s^mask)), v^_t) + MSE(~t_s, t^_t)

    `v_s^mask` (`student.image_masked`, N x d_s) is the student's embedding of an MAE-style masked
    view: a random `mask_ratio` (option, default 0.75) of patch tokens dropped per sample before the
    transformer, class token kept (`random_masking`; the engine produces it for a ViT student). The
    teacher sees the full view; the text side is unmasked. Same options as `fd` (`form`,
    `reference_dim`). Quirk, not reproduced: the released code overwrites the masked forward with
    the unmasked one (a missing `else`), so released MFD equals FD; we implement the paper's intent
    and there is no `faithful` mode (it would be a no-op). Invariant as `fd` on the masked embedding.
    """

    name = "mfd"
    needs = frozenset({"teacher", "teacher_text", "masked_view"})
    source = f"{CLIP_KD}; docs/methods.md section 2"
    options = {**FeatureDistill.options, "mask_ratio": 0.75}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        ratio = float(self.opts["mask_ratio"])
        if not 0 <= ratio < 1:
            raise UserError(f"losses.mfd.mask_ratio = {ratio} must be in [0, 1)")

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        if student.image_masked is None:
            raise UserError(
                "term 'mfd' needs the student's masked view (student.image_masked); use a ViT student, or drop mfd"
            )
        return self.modality_losses(student.image_masked, student, teacher)


def contrastive_gradients(p: Tensor, k: Tensor, tau: Tensor | float) -> tuple[Tensor, Tensor]:
    """Gradients of `CE(p k^T / tau, I)` (mean over rows) w.r.t. the anchors p and candidates k.

    `P = softmax(p k^T / tau)`, `g_p = (P - I) k / (tau N)`, `g_k = (P - I)^T p / (tau N)`; p, k: N x d.
    """
    n = p.shape[0]
    diff = torch.softmax(p @ k.t() / tau, dim=1) - torch.eye(n, dtype=p.dtype, device=p.device)
    return diff @ k / (tau * n), diff.t() @ p / (tau * n)


@register_term
class GradientDistill(_Projected):
    """CLIP-KD gradient distillation (docs/methods.md section 2, `gd`): match the contrastive loss's embedding gradients.

    For anchors p, candidates k and temperature tau (`contrastive_gradients`):
    `g_p = (P - I) k / (tau N)`, `g_k = (P - I)^T p / (tau N)`, `P = softmax(p k^T / tau)`. Directions
    image->text `(p, k) = (v, t)` and text->image `(t, v)`; the student on `~v_s`, `~t_s`, the teacher
    on `v^_t`, `t^_t`:

        L = sum over both directions of  MSE(g_p_s, g_p_t) + MSE(g_k_s, g_k_t)

    Clean: `tau = 1/s` for the student (gradient reaches `s`), `1/s_t` for the teacher.
    `faithful: true`: the code passes the exponentiated scale itself as tau (`tau = s`, `s_t`, an
    effective temperature of about 100), which makes the gradients tiny and explains the published
    weight 1e8; the clean form needs a far smaller weight (default 1; choose it on Flickr8k dev).
    Inputs: `student.image`, `student.text` (N x d_s), `student.scale`; `teacher.image`,
    `teacher.text` (N x d_t), `teacher.scale`. Returns `gd`, `gd/i2t`, `gd/t2i`.
    Invariant: L = 0 (its minimum) when `~v_s = v^_t`, `~t_s = t^_t` and `s = s_t`.
    """

    name = "gd"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = f"{CLIP_KD}; docs/methods.md section 2"
    options = {"faithful": False}

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        v_s, t_s = self.project("image", student.image), self.project("text", student.text)
        v_t, t_t = teacher.image_n.detach(), teacher.text_n.detach()
        s_t = teacher.scale.detach()
        tau_s, tau_t = (student.scale, s_t) if self.faithful else (1 / student.scale, 1 / s_t)
        logs: dict[str, Tensor] = {}
        for direction, (p_s, k_s, p_t, k_t) in {
            "i2t": (v_s, t_s, v_t, t_t),
            "t2i": (t_s, v_s, t_t, v_t),
        }.items():
            gp_s, gk_s = contrastive_gradients(p_s, k_s, tau_s)
            with torch.no_grad():
                gp_t, gk_t = contrastive_gradients(p_t, k_t, tau_t)
            logs[f"{self.name}/{direction}"] = F.mse_loss(gp_s, gp_t) + F.mse_loss(gk_s, gk_t)
        return {self.name: sum(logs.values()), **logs}


@register_term
class InteractiveContrastive(_Projected):
    """CLIP-KD interactive contrastive learning (docs/methods.md section 2, `icl`): student anchors, teacher candidates.

        L = ( CE(s_c ~v_s t^_t^T, I) + CE(s_c ~t_s v^_t^T, I) ) / 2

    Clean: `s_c = exp(c)`, c learnable (init ln(1/0.07)), clamped to at most 100. `faithful: true`:
    the code multiplies by the raw parameter c (init 2.659, no exp, no clamp; initial temperature
    about 0.376). `c` is this term's parameter (Distiller group "distiller").
    Inputs: `student.image`, `student.text` (N x d_s); `teacher.image`, `teacher.text` (N x d_t).
    Returns `icl`, `icl/i2t`, `icl/t2i`, `icl/scale`. No minimum at the teacher (an InfoNCE).
    """

    name = "icl"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = f"{CLIP_KD}; docs/methods.md section 2"
    options = {"faithful": False}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self.scale = LearnableScale(self.faithful)

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        v_s, t_s = self.project("image", student.image), self.project("text", student.text)
        v_t, t_t = teacher.image_n.detach(), teacher.text_n.detach()
        s_c = self.scale()
        y = labels_like(v_s)
        i2t = F.cross_entropy(s_c * v_s @ t_t.t(), y)
        t2i = F.cross_entropy(s_c * t_s @ v_t.t(), y)
        return {
            self.name: (i2t + t2i) / 2,
            f"{self.name}/i2t": i2t,
            f"{self.name}/t2i": t2i,
            f"{self.name}/scale": s_c.detach(),
        }


@register_term
class AugmentedFeatureDistill(_Projected):
    """CLIP-KD augmented feature distillation (docs/methods.md section 2, `afd`): task loss on student-teacher fused features.

        x_f = normalize(W_v [~v_s ; v^_t]),  y_f = normalize(W_t [~t_s ; t^_t]),  W: Linear(2 d_t, d_t) with bias
        L = ( CE(s_a x_f y_f^T, I) + CE(s_a y_f x_f^T, I) ) / 2

    `s_a` a learnable scale: clean exp-parameterised (init 1/0.07, clamped to 100), `faithful: true`
    raw (init 2.659), as `icl`. The fusion layers and `s_a` are this term's parameters and are
    discarded at export. Quirks not reproduced: the code declares `Linear(d_s + d_t, d_s)`, which
    fails whenever d_s != d_t, and the released AFD script never sets the AFD weight (it runs CRD).
    Inputs: `student.image`, `student.text` (N x d_s); `teacher.image`, `teacher.text` (N x d_t).
    Returns `afd`, `afd/scale`. No minimum at the teacher (an InfoNCE).
    """

    name = "afd"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = f"{CLIP_KD}; docs/methods.md section 2"
    options = {"faithful": False}

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        d_t = ctx.teacher_dim
        self.fuse_image = nn.Linear(2 * d_t, d_t)
        self.fuse_text = nn.Linear(2 * d_t, d_t)
        self.scale = LearnableScale(self.faithful)

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        v_s, t_s = self.project("image", student.image), self.project("text", student.text)
        v_t, t_t = teacher.image_n.detach(), teacher.text_n.detach()
        x_f = F.normalize(self.fuse_image(torch.cat([v_s, v_t], dim=-1)), dim=-1)
        y_f = F.normalize(self.fuse_text(torch.cat([t_s, t_t], dim=-1)), dim=-1)
        s_a = self.scale()
        return {self.name: contrastive_ce(s_a * x_f @ y_f.t()), f"{self.name}/scale": s_a.detach()}
