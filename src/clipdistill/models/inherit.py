"""TinyCLIP manual weight inheritance (docs/methods.md section 3; Wu et al., ICCV 2023; microsoft/Cream TinyCLIP).

Manual inheritance (`inherit_manual`, TinyCLIP `weight_inherit.py`): student layer k of each tower takes
teacher layer k * floor(L_t / L_s); every tensor keeps its leading entries along each reduced dimension
(first heads, and the first dims of each head, for q/k/v and the output projection's columns);
positional embeddings are interpolated when the student's image grid is smaller.

The structure checks here (`check_vit`, `text_parts`, `tower_blocks`) also serve automatic
inheritance (`models/pruning.py`, `models/pruned.py`).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.models.openclip import OpenClipModel

TOWERS = ("image", "text")

# --- structure ----------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, OpenClipModel) else model


def text_parts(m: nn.Module) -> tuple[SimpleNamespace, str]:
    """The text tower's pieces and its state-dict prefix (CLIP keeps them at top level)."""
    from open_clip.transformer import TextTransformer

    t = getattr(m, "text", None)
    if isinstance(t, TextTransformer):
        if t.cls_emb is not None:
            raise UserError("text towers with a class token (CoCa) are not supported; use a CLIP text tower")
        return SimpleNamespace(owner=t, pool_type=t.pool_type, eos_id=t.eos_id, pad_id=t.pad_id), "text."
    if t is not None or not hasattr(m, "transformer"):
        raise UserError("weight inheritance needs open_clip's own text transformer (not an HF text tower)")
    return SimpleNamespace(
        owner=m, pool_type=m.text_pool_type, eos_id=getattr(m, "text_eos_id", None), pad_id=0
    ), ""


def check_vit(m: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(m, "visual", None)
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise UserError(
            "weight inheritance needs an open_clip ViT image tower (not timm/ResNet, no attentional pool)"
        )
    text_parts(m)
    for blocks in (visual.transformer.resblocks, text_parts(m)[0].owner.transformer.resblocks):
        if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
            raise UserError(
                "weight inheritance supports open_clip's default blocks only (block_type 'default')"
            )


def tower_blocks(m: nn.Module, tower: str) -> nn.ModuleList:
    return (
        m.visual.transformer.resblocks if tower == "image" else text_parts(m)[0].owner.transformer.resblocks
    )


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
        raise UserError(
            f"student has {student_layers} layers, teacher {teacher_layers}; inheritance needs L_s <= L_t"
        )
    step = teacher_layers // max(student_layers, 1)
    return [k * step for k in range(student_layers)]


def _leading(src: Tensor, shape: torch.Size, key: str) -> Tensor:
    if len(src.shape) != len(shape) or any(s > t for s, t in zip(shape, src.shape)):
        raise UserError(
            f"cannot inherit '{key}': student shape {tuple(shape)} exceeds teacher {tuple(src.shape)}"
        )
    return src[tuple(slice(0, s) for s in shape)]


def _attn_shape(m: nn.Module, key: str) -> tuple[int, int]:
    attn = m.get_submodule(key.split(".attn.")[0] + ".attn")
    return attn.num_heads, attn.in_proj_weight.shape[0] // (3 * max(attn.num_heads, 1))


def inherit_manual(teacher: nn.Module, student: nn.Module) -> dict[str, str]:
    """Overwrite `student`'s weights with slices of `teacher`'s (both open_clip ViT CLIP models or
    `OpenClipModel`s); returns {student key: teacher key}."""
    from open_clip.model import resize_pos_embed

    t, s = _unwrap(teacher), _unwrap(student)
    check_vit(t)
    check_vit(s)
    if text_parts(t)[1] != text_parts(s)[1]:
        raise UserError(
            "teacher and student must both keep the text tower at top level (CLIP) or under .text"
        )
    if t.visual.patch_size != s.visual.patch_size:
        raise UserError(
            f"patch sizes differ ({t.visual.patch_size} vs {s.visual.patch_size}); inheritance keeps the patch size"
        )
    maps = {tw: layer_map(len(tower_blocks(t, tw)), len(tower_blocks(s, tw))) for tw in TOWERS}
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
