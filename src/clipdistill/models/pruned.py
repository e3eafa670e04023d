"""Dense pruned open_clip models: folding TinyCLIP's deterministic masks into smaller weights.

`prune_openclip` folds the masks of automatic inheritance (`models/pruning.py`) into a model: the hidden
mask's factors go into the embeddings and output projections, masked rows and columns are dropped, and
the dense model gives the masked model's outputs. Pruned layers may keep different head and unit counts,
so their attention is a `PrunedAttention` (inner width heads x head_dim != model width). The per-layer
sizes are recorded as `clipdistill_pruned`; `build_pruned` rebuilds that architecture to load weights
into (`openclip:DIR` of an exported pruned student).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.models.inherit import TOWERS, text_parts, tower_blocks
from clipdistill.models.openclip import build_openclip

# --- attention with per-layer head counts -------------------------------------------------------------


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
        new.out_proj = _linear(
            w_out[idx][:, keep_h].reshape(len(idx), -1), (attn.out_proj.bias.data * hz)[idx]
        )
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
            t = text_parts(model)[0].owner
            emb = t.token_embedding
            t.token_embedding = nn.Embedding(emb.num_embeddings, len(idx))
            t.token_embedding.weight.data = emb.weight.data[:, idx] * zk
            t.positional_embedding = nn.Parameter(t.positional_embedding.data[:, idx] * zk)
            t.ln_final = _new_ln(t.ln_final, idx)
            if isinstance(t.text_projection, nn.Linear):
                t.text_projection = _linear(
                    t.text_projection.weight.data[:, idx], t.text_projection.bias.data
                )
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
        for blk, (heads, d, units) in zip(tower_blocks(model, tower), spec[tower]["layers"]):
            blk.attn = PrunedAttention(width, heads, d)
            blk.mlp.c_fc, blk.mlp.c_proj = nn.Linear(width, units), nn.Linear(units, width)
    model.clipdistill_pruned = spec
    return model
