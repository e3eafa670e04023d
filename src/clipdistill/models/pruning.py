"""TinyCLIP automatic weight inheritance (docs/methods.md section 3; Wu et al., ICCV 2023; microsoft/Cream TinyCLIP).

Automatic inheritance (`MaskedClip`, TinyCLIP `l0module.py` after CoFi): hard-concrete masks over the
hidden dimension, the heads of each layer and the MLP units of each layer of both towers, with an
expected-sparsity target ramp and a Lagrangian penalty; `MaskedClip.prune()` folds deterministic masks
into a dense smaller open_clip model (`models/pruned.py`).

Masked model (decision, following TinyCLIP's masked forward): every write into the residual stream
(embeddings, attention output, MLP output) is multiplied by the hidden mask z_h; every LayerNorm reading
the stream normalises over the kept dims only (z_h != 0) and outputs 0 elsewhere; each head's context is
multiplied by its head mask before the output projection, each MLP unit by its unit mask after the
activation. Folding these factors into embeddings and output projections and dropping masked rows and
columns gives a dense model with the same outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel, Features
from clipdistill.models.inherit import TOWERS, check_vit, text_parts, tower_blocks
from clipdistill.models.openclip import OpenClipModel, _project
from clipdistill.models.pruned import attend, prune_openclip, pruned_config

# --- hard-concrete masks (Louizos et al. 2018) --------------------------------------------------------

LIMIT_L, LIMIT_R, BETA, EPS = -0.1, 1.1, 2.0 / 3.0, 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
SOFT_FACTOR = 0.8  # deterministic kept values sigmoid(0.8 log_alpha / beta), as CoFi / TinyCLIP


def sample_mask(log_alpha: Tensor) -> Tensor:
    u = torch.empty_like(log_alpha).uniform_(EPS, 1 - EPS)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def keep_probability(log_alpha: Tensor) -> Tensor:
    return 1 - torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - log_alpha)


def deterministic_mask(log_alpha: Tensor, minimum: int = 0) -> Tensor:
    """Keep exactly round(expected kept) entries, ranked by log_alpha, at their soft values; zero the rest."""
    n = max(minimum, int(round(keep_probability(log_alpha).sum().item())))
    z = torch.zeros_like(log_alpha)
    idx = log_alpha.detach().topk(n).indices
    z[idx] = torch.sigmoid(log_alpha.detach()[idx] * SOFT_FACTOR / BETA)
    return z


@dataclass
class L0Config:
    """Automatic inheritance settings (docs/methods.md section 3)."""

    target_sparsity: float = 0.5  # p_end
    start_sparsity: float = 0.0  # p_start
    warmup_steps: int = 1000
    faithful: bool = False  # one-sided penalty of the released code
    init_log_alpha: float = 10.0
    init_lambda: float = 10.0
    mask_lr: float = 0.02
    lambda_lr: float = (
        0.02  # gradient *ascent* (the code's lr -0.02; docs/methods.md section 3): `penalty` flips the sign
    )
    towers: tuple[str, ...] = TOWERS

    def target(self, step: int) -> float:
        ramp = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.start_sparsity + (self.target_sparsity - self.start_sparsity) * ramp


def _ln(ln: nn.Module, x: Tensor, keep: Tensor | None) -> Tensor:
    """LayerNorm over the kept dims only (0 elsewhere); plain `ln` without a mask."""
    if keep is None or isinstance(ln, nn.Identity):
        return ln(x) if keep is None else x
    k = keep.to(x.dtype)
    n = k.sum()
    mean = (x * k).sum(-1, keepdim=True) / n
    var = (((x - mean) * k) ** 2).sum(-1, keepdim=True) / n
    return ((x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias) * k


def _mul(x: Tensor, z: Tensor | None) -> Tensor:
    return x if z is None else x * z


def _run_blocks(blocks, x, attn_mask, z: dict | None) -> Tensor:
    hz = z["hidden"] if z else None
    keep = hz != 0 if z else None
    for i, blk in enumerate(blocks):
        a = attend(blk.attn, _ln(blk.ln_1, x, keep), attn_mask, z["heads"][i] if z else None)
        x = x + _mul(blk.ls_1(a), hz)
        u = blk.mlp.gelu(blk.mlp.c_fc(_ln(blk.ln_2, x, keep)))
        x = x + _mul(blk.ls_2(blk.mlp.c_proj(_mul(u, z["mlp"][i] if z else None))), hz)
    return x


def masked_image(m: nn.Module, images: Tensor, z: dict | None) -> tuple[Tensor, Tensor, Tensor]:
    """(embedding, pooled, patch tokens) of an open_clip ViT under masks `z` (None: no masks)."""
    v = m.visual
    keep = z["hidden"] != 0 if z else None
    x = v.conv1(images).flatten(2).transpose(1, 2)
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = v.patch_dropout(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
    x = _ln(v.ln_pre, _mul(x, z["hidden"] if z else None), keep)
    x = _run_blocks(v.transformer.resblocks, x, None, z)
    if v.final_ln_after_pool:
        pooled, tok = v._global_pool(x)
        pooled = _ln(v.ln_post, pooled, keep)
    else:
        pooled, tok = v._global_pool(_ln(v.ln_post, x, keep))
    return _project(pooled, v.proj), pooled, tok


def masked_text(m: nn.Module, text: Tensor, z: dict | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(embedding, pooled, token features, mask) of an open_clip text transformer under masks `z`."""
    from open_clip.transformer import text_global_pool

    parts, _ = text_parts(m)
    t = parts.owner
    keep = z["hidden"] != 0 if z else None
    x = t.token_embedding(text) + t.positional_embedding[: text.shape[1]]
    x = _run_blocks(t.transformer.resblocks, _mul(x, z["hidden"] if z else None), t.attn_mask, z)
    tok = _ln(t.ln_final, x, keep)
    pooled = text_global_pool(tok, text, parts.pool_type, eos_token_id=parts.eos_id)
    return _project(pooled, t.text_projection), pooled, tok, text != parts.pad_id


# --- automatic inheritance ----------------------------------------------------------------------------


def _prunable_size(model: nn.Module, tower: str) -> float:
    """Parameters the masks act on: per layer 4 d per head and 2 per MLP unit, per hidden dim (as TinyCLIP)."""
    total = 0.0
    for blk in tower_blocks(model, tower):
        width, heads = blk.ln_1.weight.shape[0], blk.attn.num_heads
        d = blk.attn.in_proj_weight.shape[0] // (3 * max(heads, 1))
        total += width * (4 * d * heads + 2 * blk.mlp.c_fc.weight.shape[0])
    return total


def _full(n: int, fill: float) -> nn.Parameter:
    return nn.Parameter(torch.full((n,), float(fill)))


def _lagrangian(lam: Tensor, gap: Tensor) -> Tensor:
    return lam[0] * gap + lam[1] * gap**2


class MaskedClip(ClipModel):
    """An open_clip ViT student under learnable hard-concrete masks (automatic inheritance).

    Training use: add `penalty(step)[0]` to the loss, put `param_groups()` in the optimiser, call
    `constrain_()` after each step, and at the end of a stage replace the student by `prune()`.
    """

    def __init__(
        self, base: OpenClipModel, cfg: L0Config | None = None, reference: dict[str, float] | None = None
    ):
        super().__init__()
        check_vit(base.model)
        self.base, self.cfg = base, cfg or L0Config()
        self.name, self.embed_dim, self.image_config = f"{base.name}+l0", base.embed_dim, base.image_config
        prior = getattr(base.model, "clipdistill_pruned", {}) or {}
        self.reference = (
            reference or prior.get("reference") or {tw: _prunable_size(base.model, tw) for tw in TOWERS}
        )
        self.log_alpha = nn.ModuleDict()
        fill = self.cfg.init_log_alpha
        for tower in self.cfg.towers:
            blocks = tower_blocks(base.model, tower)
            params = nn.Module()
            params.hidden = _full(blocks[0].ln_1.weight.shape[0], fill)
            params.heads = nn.ParameterList([_full(b.attn.num_heads, fill) for b in blocks])
            params.mlp = nn.ParameterList([_full(b.mlp.c_fc.weight.shape[0], fill) for b in blocks])
            self.log_alpha[tower] = params
        self.lambdas = nn.ParameterDict(
            {tw: nn.Parameter(torch.full((2,), self.cfg.init_lambda)) for tw in self.cfg.towers}
        )
        self.train(base.training)

    def masks(self, tower: str, deterministic: bool | None = None) -> dict | None:
        """Sampled masks in training mode, deterministic ones in eval mode (or as asked)."""
        if tower not in self.log_alpha:
            return None
        la = self.log_alpha[tower]
        det = (not self.training) if deterministic is None else deterministic
        if det:
            return {
                "hidden": deterministic_mask(la.hidden, minimum=1),
                "heads": [deterministic_mask(p) for p in la.heads],
                "mlp": [deterministic_mask(p) for p in la.mlp],
            }
        return {
            "hidden": sample_mask(la.hidden),
            "heads": [sample_mask(p) for p in la.heads],
            "mlp": [sample_mask(p) for p in la.mlp],
        }

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        emb, pooled, tok = masked_image(self.base.model, images, self.masks("image"))
        return Features(embedding=emb, pooled=pooled, tokens=tok if tokens else None)

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        emb, pooled, tok, mask = masked_text(self.base.model, text, self.masks("text"))
        return Features(
            embedding=emb, pooled=pooled, tokens=tok if tokens else None, mask=mask if tokens else None
        )

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.base.tokenize(texts)

    def raw_logit_scale(self) -> Tensor:
        return self.base.raw_logit_scale()

    def expected_sparsity(self) -> dict[str, Tensor]:
        """1 - expected remaining prunable parameters / the reference model's, per tower."""
        out = {}
        for tower, la in self.log_alpha.items():
            hidden = keep_probability(la.hidden).sum()
            blocks = tower_blocks(self.base.model, tower)
            kept = sum(
                hidden
                * (
                    keep_probability(h).sum()
                    * 4
                    * (b.attn.in_proj_weight.shape[0] // (3 * max(b.attn.num_heads, 1)))
                    + keep_probability(m).sum() * 2
                )
                for b, h, m in zip(blocks, la.heads, la.mlp)
            )
            out[tower] = 1 - kept / self.reference[tower]
        return out

    def penalty(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Lagrangian on the expected sparsity; its gradient descends for masks and ascends for lambdas.

        Clean: l1 (p_hat - p) + l2 (p_hat - p)^2; faithful: l1 max(p - p_hat, 0) + l2 max(p - p_hat, 0)^2.
        """
        target = self.cfg.target(step)
        total, logs = 0.0, {"l0/target": torch.tensor(target)}
        for tower, p_hat in self.expected_sparsity().items():
            gap = p_hat - target if not self.cfg.faithful else (target - p_hat).clamp(min=0)
            lam = self.lambdas[tower]
            masks_term = _lagrangian(lam.detach(), gap)
            lambda_term = _lagrangian(lam, gap.detach())
            # value = masks_term; d/d masks descends, d/d lambdas = -(gap terms): ascent
            total = total + masks_term - lambda_term + lambda_term.detach()
            logs[f"l0/{tower}_sparsity"] = p_hat.detach()
            logs[f"l0/{tower}_penalty"] = masks_term.detach()
        logs["l0/penalty"] = total.detach()
        return total, logs

    @torch.no_grad()
    def constrain_(self) -> None:
        for p in self.log_alpha.parameters():
            p.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def param_groups(self) -> list[dict]:
        """Masks and lambdas, no weight decay (the base model's own parameters are left to the caller)."""
        return [
            {
                "params": list(self.log_alpha.parameters()),
                "lr": self.cfg.mask_lr,
                "weight_decay": 0.0,
                "name": "l0_masks",
            },
            {
                "params": list(self.lambdas.parameters()),
                "lr": self.cfg.lambda_lr,
                "weight_decay": 0.0,
                "name": "l0_lambdas",
            },
        ]

    @torch.no_grad()
    def prune(self) -> OpenClipModel:
        """The dense smaller model with the deterministic masks folded in (same outputs in eval mode)."""
        masks = {tw: self.masks(tw, deterministic=True) for tw in self.log_alpha}
        model = copy.deepcopy(self.base.model)
        spec = dict(getattr(model, "clipdistill_pruned", {}) or {})
        spec.update(prune_openclip(model, masks))
        spec["reference"] = dict(self.reference)
        model.clipdistill_pruned = spec
        cfg = pruned_config(self.base.model_cfg, spec) if self.base.model_cfg else None
        return OpenClipModel(
            model.eval(), self.base.tokenizer, name=f"{self.base.name}+pruned", model_cfg=cfg
        )


# --- a run's student under masks (engine, export) -------------------------------------------------------


def mask_student(student: ClipModel, cfg: L0Config) -> ClipModel:
    """`student` under hard-concrete masks: a `MaskedClip` for an open_clip ViT student with its own text
    tower; for an image-only student (the teacher's text tower), its image tower masked (image masks only)."""
    if isinstance(student, OpenClipModel):
        return MaskedClip(student, cfg)
    image = getattr(student, "image", None)
    if not isinstance(image, OpenClipModel):
        raise UserError(
            f"automatic inheritance (student.sparsity) needs an open_clip ViT student, not {student.name}"
        )
    student.image = MaskedClip(image, dataclasses.replace(cfg, towers=("image",)))
    return student


def masked_part(student: ClipModel) -> MaskedClip | None:
    """The `MaskedClip` of a student built by `mask_student`, None for any other student."""
    if isinstance(student, MaskedClip):
        return student
    part = getattr(student, "image", None)
    return part if isinstance(part, MaskedClip) else None


@torch.no_grad()
def prune_student(student: ClipModel) -> ClipModel:
    """The dense pruned student of `mask_student(...)`'s result (the masked part replaced by `prune()`),
    a new object; `student` is left as it is."""
    masked = masked_part(student)
    if masked is None:
        raise ValueError("not a masked student")
    if masked is student:
        return masked.prune()
    pruned = copy.copy(student)  # shallow: shares the frozen text model; its own module dict
    pruned._modules = type(student._modules)(student._modules)
    pruned.image = masked.prune()
    return pruned.eval()


def tower_params(model: nn.Module) -> dict[str, int]:
    """Parameters of an open_clip model's image tower (visual.*) and of the rest (text, scale)."""
    counts = {"image": 0, "text": 0}
    for name, p in model.named_parameters():
        counts["image" if name.startswith("visual.") else "text"] += p.numel()
    return counts
