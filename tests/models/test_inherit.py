"""TinyCLIP manual and automatic weight inheritance on tiny random-init open_clip ViTs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipdistill.errors import UserError
from clipdistill.models.inherit import inherit_manual, layer_map
from clipdistill.models.openclip import from_config
from clipdistill.models.pruning import (
    L0Config,
    MaskedClip,
    deterministic_mask,
    keep_probability,
    masked_image,
    masked_text,
    sample_mask,
)


def cfg(image=32, width=64, layers=4, head_width=16, t_width=64, t_heads=4, t_layers=4, ctx=16, embed=32):
    return {
        "embed_dim": embed,
        "vision_cfg": {
            "image_size": image,
            "patch_size": 8,
            "width": width,
            "layers": layers,
            "head_width": head_width,
        },
        "text_cfg": {
            "context_length": ctx,
            "vocab_size": 49408,
            "width": t_width,
            "heads": t_heads,
            "layers": t_layers,
        },
    }


def build(c, seed):
    torch.manual_seed(seed)
    return from_config(c)


def inputs(model, n=3):
    x = torch.randn(
        n, 3, model.image_config.size, model.image_config.size, generator=torch.Generator().manual_seed(5)
    )
    return x, model.tokenize(["a cat", "two dogs on the grass", "x"][:n])


def test_layer_map():
    assert layer_map(12, 4) == [0, 3, 6, 9]
    assert layer_map(7, 3) == [0, 2, 4]  # front-heavy when L_t is not a multiple of L_s
    assert layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="L_s <= L_t"):
        layer_map(2, 3)


def test_same_architecture_reproduces_teacher():
    teacher, student = build(cfg(), 0), build(cfg(), 1)
    x, ids = inputs(teacher)
    with torch.no_grad():
        assert not torch.equal(teacher.encode_image(x), student.encode_image(x))
        inherit_manual(teacher, student)
        assert torch.equal(teacher.encode_image(x), student.encode_image(x))
        assert torch.equal(teacher.encode_text(ids), student.encode_text(ids))
    assert torch.equal(teacher.raw_logit_scale(), student.raw_logit_scale())


def _expected(key, t_sd, s_shape):
    """The teacher slice each student tensor must equal, written out per tensor kind."""
    parts = key.split(".")
    if "resblocks" in parts:
        i = parts.index("resblocks")
        parts[i + 1] = str(2 * int(parts[i + 1]))  # 4 teacher layers -> 2 student layers
    src = t_sd[".".join(parts)]
    if key.endswith("attn.in_proj_weight"):  # q, k, v: the first 2 heads (16 dims each), the first 32 inputs
        rows = [p * 64 + h * 16 + j for p in range(3) for h in range(2) for j in range(16)]
        return src[rows][:, :32]
    if key.endswith("attn.in_proj_bias"):
        return src[[p * 64 + h * 16 + j for p in range(3) for h in range(2) for j in range(16)]]
    if key == "visual.positional_embedding":  # 4x4 grid -> 2x2, class row sliced
        grid = src[1:, :32].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        small = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
        return torch.cat([src[:1, :32], small.permute(0, 2, 3, 1).reshape(4, 32)])
    return src[tuple(slice(0, n) for n in s_shape)]


def test_smaller_student_keeps_teacher_slices():
    teacher = build(cfg(), 0)
    student = build(cfg(image=16, width=32, layers=2, t_width=32, t_heads=2, t_layers=2, ctx=12, embed=24), 1)
    sources = inherit_manual(teacher, student)
    assert (
        sources["visual.transformer.resblocks.1.mlp.c_fc.weight"]
        == "visual.transformer.resblocks.2.mlp.c_fc.weight"
    )
    t_sd, s_sd = teacher.model.state_dict(), student.model.state_dict()
    assert s_sd["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    for key, value in s_sd.items():
        assert torch.allclose(value, _expected(key, t_sd, value.shape), atol=1e-6), key
    x, ids = inputs(student)
    assert student.encode_image(x).shape == (3, 24) and student.encode_text(ids).shape == (3, 24)


def test_inherit_refuses_incompatible_towers():
    teacher = build(cfg(), 0)
    conv = build(
        {
            **cfg(),
            "vision_cfg": {"image_size": 32, "timm_model_name": "mobilenetv3_small_050", "timm_proj": ""},
        },
        0,
    )
    with pytest.raises(UserError, match="ViT image tower"):
        inherit_manual(teacher, conv)
    other = cfg()
    other["vision_cfg"]["patch_size"] = 4
    with pytest.raises(UserError, match="patch sizes differ"):
        inherit_manual(teacher, build(other, 1))


def test_hard_concrete_formulas():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, 0.0, 2.0])
    z = sample_mask(log_alpha.expand(20000, 3))
    assert z.min() >= 0 and z.max() <= 1
    # P(z > 0) is the keep-probability 1 - sigmoid(beta log(-l/r) - log_alpha)
    expect = 1 - torch.sigmoid(2 / 3 * math.log(0.1 / 1.1) - log_alpha)
    assert torch.allclose((z > 0).float().mean(0), expect, atol=0.015)
    assert torch.allclose(keep_probability(log_alpha), expect)
    la = torch.tensor([4.0, -5.0, 3.0, -6.0, 2.0])
    det = deterministic_mask(la)
    assert (det > 0).sum().item() == round(keep_probability(la).sum().item()) == 3
    assert det[1] == 0 and det[3] == 0 and det[0] == torch.sigmoid(torch.tensor(4.0 * 0.8 * 1.5))


def test_masked_forward_without_masks_is_open_clip():
    model = build(cfg(), 0)
    x, ids = inputs(model)
    with torch.no_grad():
        assert torch.allclose(masked_image(model.model, x, None)[0], model.encode_image(x), atol=1e-5)
        assert torch.allclose(masked_text(model.model, ids, None)[0], model.encode_text(ids), atol=1e-5)


def _randomise(masked, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masked.log_alpha.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3 + 1)


def _assert_same(masked, pruned, x, ids):
    with torch.no_grad():
        for a, b in [
            (masked.image_features(x), pruned.image_features(x)),
            (masked.text_features(ids), pruned.text_features(ids)),
        ]:
            assert torch.allclose(a.embedding, b.embedding, atol=1e-5, rtol=1e-4)
            keep = a.pooled.abs().sum(0) > 0
            assert torch.allclose(a.pooled[:, keep], b.pooled, atol=1e-5, rtol=1e-4)


def test_masked_then_pruned_gives_same_outputs():
    base = build(cfg(), 0)
    masked = MaskedClip(base).eval()
    _randomise(masked, 0)
    pruned = masked.prune()
    spec = pruned.model.clipdistill_pruned
    assert spec["image"]["width"] < 64 and spec["text"]["width"] < 64
    assert any(layer[0] < 4 for layer in spec["image"]["layers"])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    x, ids = inputs(base)
    _assert_same(masked, pruned, x, ids)
    # a second stage masks the pruned model (uneven heads per layer) against the same reference size
    again = MaskedClip(pruned).eval()
    assert again.reference == masked.reference
    _randomise(again, 1)
    _assert_same(again, again.prune(), x, ids)


def test_penalty_signs_and_target_ramp():
    c = L0Config(target_sparsity=0.5, start_sparsity=0.1, warmup_steps=10)
    assert (
        c.target(0) == pytest.approx(0.1)
        and c.target(5) == pytest.approx(0.3)
        and c.target(50) == pytest.approx(0.5)
    )
    base = build(cfg(layers=2, t_layers=2), 0)
    masked = MaskedClip(base, c).train()
    sparsity = masked.expected_sparsity()
    assert all(abs(v.item()) < 1e-3 for v in sparsity.values())  # log_alpha 10: every mask open
    x, ids = inputs(base)
    loss, logs = masked.penalty(step=100)
    gap = sparsity["image"].detach() - 0.5
    assert logs["l0/image_penalty"].item() == pytest.approx(10 * gap.item() + 10 * gap.item() ** 2, rel=1e-5)
    (loss + masked.image_features(x).embedding.sum() + masked.text_features(ids).embedding.sum()).backward()
    assert torch.allclose(masked.lambdas["image"].grad, -torch.stack([gap, gap**2]), atol=1e-6)  # ascent
    assert masked.log_alpha["image"].hidden.grad.abs().sum() > 0
    assert masked.log_alpha["text"].heads[0].grad is not None
    faithful = MaskedClip(base, L0Config(target_sparsity=0.5, warmup_steps=0, faithful=True))
    assert faithful.penalty(0)[1]["l0/image_penalty"].item() == pytest.approx(10 * 0.5 + 10 * 0.25, rel=1e-3)
    masked.constrain_()
    assert masked.log_alpha["image"].hidden.max().item() == pytest.approx(math.log(100))
    groups = {g["name"]: g for g in masked.param_groups()}
    assert groups["l0_masks"]["lr"] == 0.02 and groups["l0_lambdas"]["weight_decay"] == 0.0
