"""TinyCLIP weight inheritance (docs/methods.md section 3; Wu et al., ICCV 2023; microsoft/Cream TinyCLIP).

Manual inheritance (`inherit_manual`, TinyCLIP `weight_inherit.py`): student layer k of each tower takes
teacher layer k * floor(L_t / L_s); every tensor keeps its leading entries along each reduced dimension
(first heads, and the first dims of each head, for q/k/v and the output projection's columns);
positional embeddings are interpolated when the student's image grid is smaller.

Automatic inheritance (`MaskedClip`, TinyCLIP `l0module.py` after CoFi): hard-concrete masks over the
hidden dimension, the heads of each layer and the MLP units of each layer of both towers, with an
expected-sparsity target ramp and a Lagrangian penalty; `MaskedClip.prune()` folds deterministic masks
into a dense smaller open_clip model.

Masked model (decision, following TinyCLIP's masked forward): every write into the residual stream
(embeddings, attention output, MLP output) is multiplied by the hidden mask z_h; every LayerNorm reading
the stream normalises over the kept dims only (z_h != 0) and outputs 0 elsewhere; each head's context is
multiplied by its head mask before the output projection, each MLP unit by its unit mask after the
activation. Folding these factors into embeddings and output projections and dropping masked rows and
columns gives a dense model with the same outputs. Pruned layers may keep different head and unit
counts, so their attention is a `PrunedAttention` (inner width heads x head_dim != model width).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel, Features
from clipdistill.models.openclip import OpenClipModel, _project, build_openclip

TOWERS = ("image", "text")

# --- structure ----------------------------------------------------------------------------------------


class PrunedAttention(nn.Module):
    """Self-attention with `num_heads` heads of `head_dim` on a `embed_dim`-wide stream: a drop-in for
    `nn.MultiheadAttention` in open_clip's `ResidualAttentionBlock` (batch first, need_weights=False)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim).normal_(std=embed_dim**-0.5))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = nn.Linear(inner, embed_dim)

    def forward(self, query: Tensor, key=None, value=None, need_weights: bool = False, attn_mask=None):
        return attend(self, query, attn_mask), None


def attend(attn: nn.Module, h: Tensor, attn_mask: Tensor | None, head_z: Tensor | None = None) -> Tensor:
    """Multi-head self-attention from `in_proj_weight` / `out_proj`, optionally scaling each head's context."""
    n, length, _ = h.shape
    heads = attn.num_heads
    if heads == 0:  # every head pruned: only the output bias remains
        return attn.out_proj(h.new_zeros(n, length, 0))
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(n, length, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if head_z is not None:
        ctx = ctx * head_z.view(1, heads, 1, 1)
    return attn.out_proj(ctx.transpose(1, 2).reshape(n, length, -1))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, OpenClipModel) else model


def _text_parts(m: nn.Module) -> tuple[SimpleNamespace, str]:
    """The text tower's pieces and its state-dict prefix (CLIP keeps them at top level)."""
    from open_clip.transformer import TextTransformer

    t = getattr(m, "text", None)
    if isinstance(t, TextTransformer):
        if t.cls_emb is not None:
            raise UserError("text towers with a class token (CoCa) are not supported; use a CLIP text tower")
        return SimpleNamespace(owner=t, pool_type=t.pool_type, eos_id=t.eos_id, pad_id=t.pad_id), "text."
    if t is not None or not hasattr(m, "transformer"):
        raise UserError("weight inheritance needs open_clip's own text transformer (not an HF text tower)")
    return SimpleNamespace(owner=m, pool_type=m.text_pool_type, eos_id=getattr(m, "text_eos_id", None), pad_id=0), ""


def _check_vit(m: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(m, "visual", None)
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise UserError("weight inheritance needs an open_clip ViT image tower (not timm/ResNet, no attentional pool)")
    _text_parts(m)
    for blocks in (visual.transformer.resblocks, _text_parts(m)[0].owner.transformer.resblocks):
        if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
            raise UserError("weight inheritance supports open_clip's default blocks only (block_type 'default')")


def _blocks(m: nn.Module, tower: str) -> nn.ModuleList:
    return m.visual.transformer.resblocks if tower == "image" else _text_parts(m)[0].owner.transformer.resblocks


def _tower_of(key: str) -> str | None:
    if key.startswith("visual."):
        return "image"
    if key.startswith(("logit_scale", "logit_bias")):
        return None
    return "text"


# --- manual inheritance -------------------------------------------------------------------------------

_LAYER = re.compile(r"(.*resblocks\.)(\d+)(\..*)")


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer of each student layer: k * floor(L_t / L_s) (favours front layers, as TinyCLIP does)."""
    if student_layers > teacher_layers:
        raise UserError(f"student has {student_layers} layers, teacher {teacher_layers}; inheritance needs L_s <= L_t")
    step = teacher_layers // max(student_layers, 1)
    return [k * step for k in range(student_layers)]


def _leading(src: Tensor, shape: torch.Size, key: str) -> Tensor:
    if len(src.shape) != len(shape) or any(s > t for s, t in zip(shape, src.shape)):
        raise UserError(f"cannot inherit '{key}': student shape {tuple(shape)} exceeds teacher {tuple(src.shape)}")
    return src[tuple(slice(0, s) for s in shape)]


def _attn_shape(m: nn.Module, key: str) -> tuple[int, int]:
    attn = m.get_submodule(key.split(".attn.")[0] + ".attn")
    return attn.num_heads, attn.in_proj_weight.shape[0] // (3 * max(attn.num_heads, 1))


def inherit_manual(teacher: nn.Module, student: nn.Module) -> dict[str, str]:
    """Overwrite `student`'s weights with slices of `teacher`'s (both open_clip ViT CLIP models or
    `OpenClipModel`s); returns {student key: teacher key}."""
    from open_clip.model import resize_pos_embed

    t, s = _unwrap(teacher), _unwrap(student)
    _check_vit(t)
    _check_vit(s)
    if _text_parts(t)[1] != _text_parts(s)[1]:
        raise UserError("teacher and student must both keep the text tower at top level (CLIP) or under .text")
    if t.visual.patch_size != s.visual.patch_size:
        raise UserError(f"patch sizes differ ({t.visual.patch_size} vs {s.visual.patch_size}); inheritance keeps the patch size")
    maps = {tw: layer_map(len(_blocks(t, tw)), len(_blocks(s, tw))) for tw in TOWERS}
    t_sd, new, sources = t.state_dict(), {}, {}
    for key, ref in s.state_dict().items():
        tower = _tower_of(key)
        match = _LAYER.fullmatch(key)
        tkey = key if not match else f"{match[1]}{maps[tower][int(match[2])]}{match[3]}"
        src = t_sd[tkey]
        if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight")):
            (ht, dt), (hs, ds) = _attn_shape(t, tkey), _attn_shape(s, key)
            if key.endswith("in_proj_weight"):
                out = src.view(3, ht, dt, -1)[:, :hs, :ds, : ref.shape[1]].reshape(ref.shape)
            elif key.endswith("in_proj_bias"):
                out = src.view(3, ht, dt)[:, :hs, :ds].reshape(ref.shape)
            else:
                out = src.view(src.shape[0], ht, dt)[: ref.shape[0], :hs, :ds].reshape(ref.shape)
        elif key == "visual.positional_embedding" and ref.shape[0] != src.shape[0]:
            holder = {key: src[:, : ref.shape[1]]}
            resize_pos_embed(holder, s)
            out = holder[key]
        else:
            out = _leading(src, ref.shape, key)
        new[key], sources[key] = out.clone(), tkey
    s.load_state_dict(new, strict=True)
    return sources


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
    lambda_lr: float = 0.02  # gradient *ascent* (the code's lr -0.02; docs/methods.md section 3): `penalty` flips the sign
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

    parts, _ = _text_parts(m)
    t = parts.owner
    keep = z["hidden"] != 0 if z else None
    x = t.token_embedding(text) + t.positional_embedding[: text.shape[1]]
    x = _run_blocks(t.transformer.resblocks, _mul(x, z["hidden"] if z else None), t.attn_mask, z)
    tok = _ln(t.ln_final, x, keep)
    pooled = text_global_pool(tok, text, parts.pool_type, eos_token_id=parts.eos_id)
    return _project(pooled, t.text_projection), pooled, tok, text != parts.pad_id


# --- pruning ------------------------------------------------------------------------------------------


def _new_ln(ln: nn.Module, idx: Tensor) -> nn.Module:
    if isinstance(ln, nn.Identity):
        return ln
    new = type(ln)(len(idx), eps=ln.eps)
    new.weight.data, new.bias.data = ln.weight.data[idx].clone(), ln.bias.data[idx].clone()
    return new


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data = weight.contiguous().clone()
    if bias is not None:
        lin.bias.data = bias.contiguous().clone()
    return lin


def _prune_blocks(blocks: nn.ModuleList, z: dict, idx: Tensor) -> list[list[int]]:
    hz, sizes = z["hidden"], []
    for i, blk in enumerate(blocks):
        attn, az, mz = blk.attn, z["heads"][i], z["mlp"][i]
        heads, d = attn.num_heads, attn.in_proj_weight.shape[0] // (3 * max(attn.num_heads, 1))
        keep_h, keep_m = az.nonzero().flatten(), mz.nonzero().flatten()
        new = PrunedAttention(len(idx), len(keep_h), d)
        w_in = attn.in_proj_weight.data.view(3, heads, d, -1)[:, keep_h][..., idx]
        new.in_proj_weight.data = w_in.reshape(-1, len(idx)).contiguous()
        new.in_proj_bias.data = attn.in_proj_bias.data.view(3, heads, d)[:, keep_h].reshape(-1).contiguous()
        w_out = (attn.out_proj.weight.data * hz[:, None]).view(-1, heads, d) * az.view(1, heads, 1)
        new.out_proj = _linear(w_out[idx][:, keep_h].reshape(len(idx), -1), (attn.out_proj.bias.data * hz)[idx])
        blk.attn, blk.ln_1, blk.ln_2 = new, _new_ln(blk.ln_1, idx), _new_ln(blk.ln_2, idx)
        for ls in (blk.ls_1, blk.ls_2):
            if hasattr(ls, "gamma"):
                ls.gamma = nn.Parameter(ls.gamma.data[idx].clone())
        fc, proj = blk.mlp.c_fc, blk.mlp.c_proj
        blk.mlp.c_fc = _linear(fc.weight.data[keep_m][:, idx], fc.bias.data[keep_m])
        w = (proj.weight.data * hz[:, None] * mz[None, :])[idx][:, keep_m]
        blk.mlp.c_proj = _linear(w, (proj.bias.data * hz)[idx])
        sizes.append([len(keep_h), d, len(keep_m)])
    return sizes


def prune_openclip(model: nn.Module, masks: dict[str, dict]) -> dict:
    """Fold deterministic `masks` ({tower: {"hidden", "heads", "mlp"}}) into `model` in place; returns the
    per-tower sizes {tower: {"width": W, "layers": [[heads, head_dim, mlp], ...]}}."""
    spec = {}
    for tower, z in masks.items():
        hz = z["hidden"]
        idx = hz.nonzero().flatten()
        zk = hz[idx]
        if tower == "image":
            v = model.visual
            v.conv1.weight = nn.Parameter(v.conv1.weight.data[idx] * zk.view(-1, 1, 1, 1))
            v.class_embedding = nn.Parameter(v.class_embedding.data[idx] * zk)
            v.positional_embedding = nn.Parameter(v.positional_embedding.data[:, idx] * zk)
            v.ln_pre, v.ln_post = _new_ln(v.ln_pre, idx), _new_ln(v.ln_post, idx)
            v.proj = nn.Parameter(v.proj.data[idx].clone())
            blocks = v.transformer.resblocks
        else:
            t = _text_parts(model)[0].owner
            emb = t.token_embedding
            t.token_embedding = nn.Embedding(emb.num_embeddings, len(idx))
            t.token_embedding.weight.data = emb.weight.data[:, idx] * zk
            t.positional_embedding = nn.Parameter(t.positional_embedding.data[:, idx] * zk)
            t.ln_final = _new_ln(t.ln_final, idx)
            if isinstance(t.text_projection, nn.Linear):
                t.text_projection = _linear(t.text_projection.weight.data[:, idx], t.text_projection.bias.data)
            elif t.text_projection is not None:
                t.text_projection = nn.Parameter(t.text_projection.data[idx].clone())
            blocks = t.transformer.resblocks
        spec[tower] = {"width": len(idx), "layers": _prune_blocks(blocks, z, idx)}
    return spec


def pruned_config(model_cfg: dict, spec: dict) -> dict:
    """The open_clip config whose widths match a pruned model (heads are set per layer by `build_pruned`)."""
    cfg = copy.deepcopy(model_cfg)
    if "image" in spec:
        cfg["vision_cfg"].update(width=spec["image"]["width"], head_width=spec["image"]["width"])
    if "text" in spec:
        cfg["text_cfg"].update(width=spec["text"]["width"], heads=1)
    return cfg


def build_pruned(model_cfg: dict, spec: dict) -> nn.Module:
    """An open_clip model with the per-layer sizes of a pruned model (random weights, to load into)."""
    model = build_openclip(pruned_config(model_cfg, spec))
    for tower in TOWERS:
        if tower not in spec:
            continue
        width = spec[tower]["width"]
        for blk, (heads, d, units) in zip(_blocks(model, tower), spec[tower]["layers"]):
            blk.attn = PrunedAttention(width, heads, d)
            blk.mlp.c_fc, blk.mlp.c_proj = nn.Linear(width, units), nn.Linear(units, width)
    model.clipdistill_pruned = spec
    return model


# --- automatic inheritance ----------------------------------------------------------------------------


def _prunable_size(model: nn.Module, tower: str) -> float:
    """Parameters the masks act on: per layer 4 d per head and 2 per MLP unit, per hidden dim (as TinyCLIP)."""
    total = 0.0
    for blk in _blocks(model, tower):
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

    def __init__(self, base: OpenClipModel, cfg: L0Config | None = None, reference: dict[str, float] | None = None):
        super().__init__()
        _check_vit(base.model)
        self.base, self.cfg = base, cfg or L0Config()
        self.name, self.embed_dim, self.image_config = f"{base.name}+l0", base.embed_dim, base.image_config
        prior = getattr(base.model, "clipdistill_pruned", {}) or {}
        self.reference = reference or prior.get("reference") or {
            tw: _prunable_size(base.model, tw) for tw in TOWERS
        }
        self.log_alpha = nn.ModuleDict()
        fill = self.cfg.init_log_alpha
        for tower in self.cfg.towers:
            blocks = _blocks(base.model, tower)
            params = nn.Module()
            params.hidden = _full(blocks[0].ln_1.weight.shape[0], fill)
            params.heads = nn.ParameterList([_full(b.attn.num_heads, fill) for b in blocks])
            params.mlp = nn.ParameterList([_full(b.mlp.c_fc.weight.shape[0], fill) for b in blocks])
            self.log_alpha[tower] = params
        self.lambdas = nn.ParameterDict({tw: nn.Parameter(torch.full((2,), self.cfg.init_lambda)) for tw in self.cfg.towers})
        self.train(base.training)

    def masks(self, tower: str, deterministic: bool | None = None) -> dict | None:
        """Sampled masks in training mode, deterministic ones in eval mode (or as asked)."""
        if tower not in self.log_alpha:
            return None
        la = self.log_alpha[tower]
        det = (not self.training) if deterministic is None else deterministic
        if det:
            return {"hidden": deterministic_mask(la.hidden, minimum=1), "heads": [deterministic_mask(p) for p in la.heads],
                    "mlp": [deterministic_mask(p) for p in la.mlp]}
        return {"hidden": sample_mask(la.hidden), "heads": [sample_mask(p) for p in la.heads],
                "mlp": [sample_mask(p) for p in la.mlp]}

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        emb, pooled, tok = masked_image(self.base.model, images, self.masks("image"))
        return Features(embedding=emb, pooled=pooled, tokens=tok if tokens else None)

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        emb, pooled, tok, mask = masked_text(self.base.model, text, self.masks("text"))
        return Features(embedding=emb, pooled=pooled, tokens=tok if tokens else None, mask=mask if tokens else None)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.base.tokenize(texts)

    def raw_logit_scale(self) -> Tensor:
        return self.base.raw_logit_scale()

    def expected_sparsity(self) -> dict[str, Tensor]:
        """1 - expected remaining prunable parameters / the reference model's, per tower."""
        out = {}
        for tower, la in self.log_alpha.items():
            hidden = keep_probability(la.hidden).sum()
            blocks = _blocks(self.base.model, tower)
            kept = sum(
                hidden * (keep_probability(h).sum() * 4 * (b.attn.in_proj_weight.shape[0] // (3 * max(b.attn.num_heads, 1)))
                          + keep_probability(m).sum() * 2)
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
            {"params": list(self.log_alpha.parameters()), "lr": self.cfg.mask_lr, "weight_decay": 0.0, "name": "l0_masks"},
            {"params": list(self.lambdas.parameters()), "lr": self.cfg.lambda_lr, "weight_decay": 0.0, "name": "l0_lambdas"},
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
        return OpenClipModel(model.eval(), self.base.tokenizer, name=f"{self.base.name}+pruned", model_cfg=cfg)
