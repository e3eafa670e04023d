"""CLIP-KD terms crd, fd, mfd, gd, icl, afd (spec 2): loop references, gradcheck, invariants, projectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refs_clip import (
    build,
    ce_identity,
    clip_loss,
    contrastive_grads,
    kl_mean,
    linear,
    logits,
    make_pair,
    mse,
    np_,
    project_rows,
    unit,
)
from torch.func import functional_call

from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.losses.clip_kd import contrastive_gradients, random_masking

WIDTHS = [(5, 5), (3, 5)]


def projectors(dist) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    return {
        m: (np_(dist.projectors[m].weight), np_(dist.projectors[m].bias)) if m in dist.projectors else None
        for m in ("image", "text")
    }


def test_crd_matches_loop_reference_with_unprojected_features():
    s, t = make_pair(6, 3, 5, seed=1)
    dist = build("crd", 3, 5)
    out = dist.terms["crd"](s, t)
    z_s, z_t = logits(np_(s.image), np_(s.text), 5.0), logits(np_(t.image), np_(t.text), 7.0)
    assert out["crd"].item() == pytest.approx((kl_mean(z_t, z_s) + kl_mean(z_t.T, z_s.T)) / 2, rel=1e-10)
    assert len(dist.projectors) == 0  # relation-only: no projector


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
@pytest.mark.parametrize("masked", [False, True])
def test_fd_and_mfd_match_loop_reference(d_s, d_t, masked):
    s, t = make_pair(6, d_s, d_t, seed=2)
    name = "mfd" if masked else "fd"
    dist = build(name, d_s, d_t)
    out = dist.terms[name](s, t)
    proj = projectors(dist)
    assert (proj["image"] is None) == (d_s == d_t)
    img = np_(s.image_masked if masked else s.image)
    l_img = mse(project_rows(img, proj["image"]), np.array([unit(r) for r in np_(t.image)]))
    l_txt = mse(project_rows(np_(s.text), proj["text"]), np.array([unit(r) for r in np_(t.text)]))
    assert out[f"{name}/image"].item() == pytest.approx(l_img, rel=1e-10)
    assert out[name].item() == pytest.approx(l_img + l_txt, rel=1e-10)


def test_fd_cosine_form_equals_mse_at_reference_width_and_rescales_otherwise():
    s, t = make_pair(6, 3, 512, seed=3)
    dist = build("fd", 3, 512)
    cos = build("fd", 3, 512, form="cosine")
    assert cos.terms["fd"](s, t)["fd"].item() == pytest.approx(dist.terms["fd"](s, t)["fd"].item(), rel=1e-10)
    s, t = make_pair(6, 3, 8, seed=3)
    out = build("fd", 3, 8, form="cosine", reference_dim=512)
    v = F.normalize(out.projectors["image"](s.image), dim=-1)
    expect = (1 - (v * F.normalize(t.image, dim=-1)).sum(-1)).mean() * 2 / 512
    assert out.terms["fd"](s, t)["fd/image"].item() == pytest.approx(expect.item(), rel=1e-10)


def test_mfd_without_masked_view_is_a_user_error():
    s, t = make_pair(4, 4, 4, seed=4)
    with pytest.raises(UserError, match="masked view"):
        build("mfd", 4, 4).terms["mfd"](s.replace(image_masked=None), t)


def test_contrastive_gradients_are_the_autograd_gradients_of_infonce():
    g = torch.Generator().manual_seed(5)
    p = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
    tau = 0.3
    loss = F.cross_entropy(p @ k.t() / tau, torch.arange(5))
    auto_p, auto_k = torch.autograd.grad(loss, [p, k])
    ours_p, ours_k = contrastive_gradients(p, k, tau)
    torch.testing.assert_close(ours_p, auto_p)
    torch.testing.assert_close(ours_k, auto_k)


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
@pytest.mark.parametrize("faithful", [False, True])
def test_gd_matches_loop_reference(d_s, d_t, faithful):
    s, t = make_pair(5, d_s, d_t, seed=6)
    dist = build("gd", d_s, d_t, faithful=faithful)
    out = dist.terms["gd"](s, t)
    proj = projectors(dist)
    v_s, t_s = project_rows(np_(s.image), proj["image"]), project_rows(np_(s.text), proj["text"])
    v_t, t_t = np.array([unit(r) for r in np_(t.image)]), np.array([unit(r) for r in np_(t.text)])
    tau_s, tau_t = (5.0, 7.0) if faithful else (1 / 5.0, 1 / 7.0)
    total = 0.0
    for p_s, k_s, p_t, k_t in ((v_s, t_s, v_t, t_t), (t_s, v_s, t_t, v_t)):
        gps, gks = contrastive_grads(p_s, k_s, tau_s)
        gpt, gkt = contrastive_grads(p_t, k_t, tau_t)
        total += mse(gps, gpt) + mse(gks, gkt)
    assert out["gd"].item() == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
@pytest.mark.parametrize("faithful", [False, True])
def test_icl_matches_loop_reference(d_s, d_t, faithful):
    s, t = make_pair(6, d_s, d_t, seed=7)
    dist = build("icl", d_s, d_t, faithful=faithful)
    with torch.no_grad():
        dist.terms["icl"].scale.logit.fill_(2.2)
    out = dist.terms["icl"](s, t)
    scale = 2.2 if faithful else math.exp(2.2)
    proj = projectors(dist)
    v_s, t_s = project_rows(np_(s.image), proj["image"]), project_rows(np_(s.text), proj["text"])
    ref = (ce_identity(logits(v_s, np_(t.text), scale)) + ce_identity(logits(t_s, np_(t.image), scale))) / 2
    assert out["icl"].item() == pytest.approx(ref, rel=1e-10)
    assert out["icl/scale"].item() == pytest.approx(scale)


def test_learnable_scale_initialisation_and_clamp():
    clean, faithful = build("icl", 4, 4).terms["icl"], build("icl", 4, 4, faithful=True).terms["icl"]
    assert clean.scale().item() == pytest.approx(1 / 0.07)
    assert faithful.scale().item() == pytest.approx(2.6593, abs=1e-4)
    with torch.no_grad():
        clean.scale.logit.fill_(6.0)
        faithful.scale.logit.fill_(150.0)
    assert clean.scale().item() == pytest.approx(100.0)
    assert faithful.scale().item() == pytest.approx(150.0)  # the code's raw parameter is never clamped


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
@pytest.mark.parametrize("faithful", [False, True])
def test_afd_matches_loop_reference(d_s, d_t, faithful):
    s, t = make_pair(6, d_s, d_t, seed=8)
    dist = build("afd", d_s, d_t, faithful=faithful)
    term = dist.terms["afd"]
    out = term(s, t)
    scale = term.scale().item()
    proj = projectors(dist)
    fused = {}
    for key, mod, layer in (("x", "image", term.fuse_image), ("y", "text", term.fuse_text)):
        s_n = project_rows(np_(getattr(s, mod)), proj[mod])
        t_n = np.array([unit(r) for r in np_(getattr(t, mod))])
        fused[key] = np.array(
            [
                unit(linear(np_(layer.weight), np_(layer.bias), np.concatenate([a, b])))
                for a, b in zip(s_n, t_n)
            ]
        )
    assert term.fuse_image.in_features == 2 * d_t and term.fuse_image.out_features == d_t
    assert out["afd"].item() == pytest.approx(
        clip_loss(logits(fused["x"], fused["y"], scale, normalize=False)), rel=1e-10
    )


@pytest.mark.parametrize(
    "name,opts",
    [
        ("crd", {}),
        ("fd", {}),
        ("fd", {"form": "cosine"}),
        ("mfd", {}),
        ("gd", {}),
        ("gd", {"faithful": True}),
        ("icl", {}),
        ("icl", {"faithful": True}),
        ("afd", {}),
        ("afd", {"faithful": True}),
    ],
)
def test_gradcheck_inputs_and_distiller_parameters(name, opts):
    s, t = make_pair(4, 3, 5, seed=9, s=2.0, s_t=3.0)
    dist = build(name, 3, 5, **opts)
    names = [k for k, p in dist.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in dist.parameters())

    def fn(img, txt, masked, scale, *ps):
        student = Outputs(image=img, text=txt, scale=scale, image_masked=masked)
        return functional_call(dist, dict(zip(names, ps)), (student, t))[0]

    # fast_mode checks random projections of the Jacobian: the same test, a fraction of the time.
    assert torch.autograd.gradcheck(fn, (s.image, s.text, s.image_masked, s.scale, *params), fast_mode=True)


@pytest.mark.parametrize("name", ["fd", "mfd", "gd"])
@pytest.mark.parametrize("d_s,d_t", WIDTHS)
def test_minimum_when_student_reproduces_teacher(name, d_s, d_t):
    """Zero value and zero gradient when the (projected) student equals the teacher; larger when moved."""
    _, t = make_pair(6, d_s, d_t, seed=10)
    dist = build(name, d_s, d_t)
    if d_s == d_t:
        img, txt = t.image.clone(), t.text.clone()
    else:
        # A teacher that the projector reproduces exactly: t = P(x) for random student vectors x.
        g = torch.Generator().manual_seed(11)
        img = torch.randn(6, d_s, generator=g, dtype=torch.float64)
        txt = torch.randn(6, d_s, generator=g, dtype=torch.float64)
        t = t.replace(
            image=dist.projectors["image"](img).detach(), text=dist.projectors["text"](txt).detach()
        )
    student = Outputs(
        image=img.clone().requires_grad_(),
        text=txt.clone().requires_grad_(),
        scale=t.scale.clone().requires_grad_(),
    )
    student.image_masked = student.image
    total, _ = dist(student, t)
    assert abs(total.item()) < 1e-12
    grads = torch.autograd.grad(total, [student.image, student.text, *dist.parameters()])
    assert max(g.abs().max().item() for g in grads) < 1e-10
    moved = student.replace(
        image=student.image + 0.1, image_masked=student.image + 0.1, scale=student.scale * 1.1
    )
    assert dist(moved, t)[0].item() > 1e-8


def test_random_masking_keeps_class_token_and_order():
    tokens = torch.arange(2 * 9, dtype=torch.float64).view(2, 9, 1).repeat(1, 1, 3)
    g = torch.Generator().manual_seed(0)
    out = random_masking(tokens, 0.75, num_prefix=1, generator=g)
    assert out.shape == (2, 1 + 2, 3)
    torch.testing.assert_close(out[:, 0], tokens[:, 0])
    kept = out[:, 1:, 0]
    assert bool((kept[:, 1:] > kept[:, :-1]).all())  # original order
    assert set(kept[0].tolist()) <= set(tokens[0, 1:, 0].tolist())
    many = random_masking(tokens.repeat(50, 1, 1), 0.75, generator=g)[:, 1:, 0] % 9
    assert len({tuple(r) for r in many.tolist()}) > 5  # a different subset per sample
