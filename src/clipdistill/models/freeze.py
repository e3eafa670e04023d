"""Partial freezing of a student's image tower, and its split into a frozen prefix and a trainable suffix.

`student.freeze: N` keeps the first N blocks of the image trunk frozen, the stem included:
- timm EfficientNet-style trunks (open_clip `TimmModel`): `conv_stem`, `bn1`, `blocks[:N]`;
- open_clip `VisionTransformer`: the patch and positional embeddings, `ln_pre`, `transformer.resblocks[:N]`.

Frozen modules get `requires_grad=False` and stay in eval mode for good (their batch-norm statistics
never move), so the frozen prefix is a fixed function of the image. That makes its output cacheable
like the teacher's frozen towers: `split_image_tower` returns (prefix, suffix) modules with
suffix(prefix(x)) equal to the tower's embedding, and `train.prefix` trains the suffix on stored prefix
activations (one trunk forward per image ever, instead of one per step).
"""

from __future__ import annotations

import types

from torch import Tensor, nn

from clipdistill.errors import UserError


def _always_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _visual(model: nn.Module) -> nn.Module:
    inner = getattr(model, "image", model)  # ImageOnlyStudent -> its OpenClipModel
    inner = getattr(inner, "model", inner)  # OpenClipModel -> open_clip CLIP
    return getattr(inner, "visual", inner)  # an inherited image tower (`.trunk` + `.head`) is its own visual


def _is_effnet(visual: nn.Module) -> bool:
    """A timm EfficientNet-style trunk under `.trunk` with a `.head` after it (open_clip `TimmModel`, or the
    composed teacher's inherited image tower)."""
    return hasattr(visual, "trunk") and hasattr(visual, "head") and hasattr(visual.trunk, "conv_stem")


def prefix_modules(model: nn.Module, n: int) -> list[nn.Module]:
    """The modules of the first `n` trunk blocks (stem included) of a student's image tower."""
    from open_clip.transformer import VisionTransformer

    visual = _visual(model)
    if _is_effnet(visual) and hasattr(visual.trunk, "blocks"):
        trunk, blocks = visual.trunk, visual.trunk.blocks
        stem = [trunk.conv_stem, trunk.bn1]
    elif isinstance(visual, VisionTransformer):
        trunk, blocks = visual, visual.transformer.resblocks
        stem = [m for m in (visual.conv1, visual.patch_dropout, visual.ln_pre) if m is not None]
    else:
        raise UserError(
            f"student.freeze needs a timm EfficientNet-style or ViT image tower, not {type(visual).__name__}; "
            "set student.freeze: 0"
        )
    if not 0 <= n <= len(blocks):
        raise UserError(
            f"student.freeze = {n}, but the image trunk has {len(blocks)} blocks; use 0..{len(blocks)}"
        )
    return [*stem, *blocks[:n]] if n > 0 else []


def freeze_prefix(model: nn.Module, n: int) -> int:
    """Freeze the first `n` trunk blocks (and the stem) of `model`'s image tower; returns the number of
    frozen parameters."""
    if n == 0:
        return 0
    from open_clip.transformer import VisionTransformer

    modules = prefix_modules(model, n)
    visual = _visual(model)
    params = [p for m in modules for p in m.parameters()]
    if isinstance(visual, VisionTransformer):
        params += [visual.class_embedding, visual.positional_embedding]
    for p in params:
        p.requires_grad_(False)
    for m in modules:
        freeze_module(m)
    return sum(p.numel() for p in params)


def freeze_module(module: nn.Module) -> None:
    """No gradient, and eval mode for good (its batch-norm statistics never move, whatever `.train()` says)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for sub in module.modules():
        sub.train = types.MethodType(_always_eval, sub)
        nn.Module.train(sub, False)


class _EffnetPrefix(nn.Module):
    def __init__(self, trunk: nn.Module, n: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(trunk.conv_stem, trunk.bn1)
        self.blocks = nn.Sequential(*trunk.blocks[:n])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))


class _EffnetSuffix(nn.Module):
    """The rest of a timm EfficientNet trunk, its pooling and open_clip's head: prefix output -> embedding."""

    def __init__(self, visual: nn.Module, n: int) -> None:
        super().__init__()
        trunk = visual.trunk
        self.blocks = nn.Sequential(*trunk.blocks[n:])
        self.conv_head, self.bn2, self.pool = trunk.conv_head, trunk.bn2, trunk.global_pool
        self.head = visual.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.bn2(self.conv_head(self.blocks(x)))))


def split_image_tower(model: nn.Module, n: int) -> tuple[nn.Module, nn.Module]:
    """(prefix, suffix) sharing `model`'s modules, with suffix(prefix(x)) == the image embedding.

    Only timm EfficientNet-style trunks split here (the CNN students whose prefixes are worth caching)."""
    visual = _visual(model)
    if not _is_effnet(visual):
        raise UserError(
            f"a cached frozen prefix needs a timm EfficientNet-style student, not {type(visual).__name__}"
        )
    prefix_modules(model, n)  # range check
    return _EffnetPrefix(visual.trunk, n), _EffnetSuffix(visual, n)


def keep_first_blocks(model: nn.Module, depths: list[int]) -> None:
    """Cut an EfficientNet-style image trunk in place to the first `depths[i]` blocks of each stage i (the
    first block of a stage changes width and stride, the others are residual: TinyCLIP's manual
    inheritance, as `composed_inherit.InheritedImage` does for the composed teacher's tower)."""
    visual = _visual(model)
    if not (_is_effnet(visual) and hasattr(visual.trunk, "blocks")):
        raise UserError(
            f"fewer blocks per stage needs an EfficientNet-style image tower, not {type(visual).__name__}"
        )
    full = [len(stage) for stage in visual.trunk.blocks]
    if len(depths) != len(full) or any(not 1 <= d <= f for d, f in zip(depths, full)):
        raise UserError(f"image depths {list(depths)} must keep 1..{full} blocks per stage")
    visual.trunk.blocks = nn.Sequential(
        *[nn.Sequential(*stage[:d]) for stage, d in zip(visual.trunk.blocks, depths)]
    )
