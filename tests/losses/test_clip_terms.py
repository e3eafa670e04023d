"""clip, kd (spec 1) and TinyCLIP's affinity (spec 3): loop references, gradcheck, invariants."""

from __future__ import annotations

import pytest
import torch
from refs_clip import build, clip_loss, kl_mean, logits, make_pair, np_, soft_ce_mean

from clipdistill.losses.base import Outputs

WIDTHS = [(5, 5), (3, 5)]  # equal widths and a student narrower than the teacher


def value(dist, name, s, t):
    return dist.terms[name](s, t)


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
def test_clip_matches_loop_reference(d_s, d_t):
    s, t = make_pair(6, d_s, d_t, seed=1)
    out = value(build("clip", d_s, d_t), "clip", s, t)
    ref = clip_loss(logits(np_(s.image), np_(s.text), 5.0))
    assert out["clip"].item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize("faithful", [False, True])
def test_kd_matches_loop_reference(d_s, d_t, temp, faithful):
    s, t = make_pair(6, d_s, d_t, seed=2)
    out = value(build("kd", d_s, d_t, temperature=temp, faithful=faithful), "kd", s, t)
    z_s, z_t = logits(np_(s.image), np_(s.text), 5.0), logits(np_(t.image), np_(t.text), 7.0)
    fn = soft_ce_mean if faithful else kl_mean
    i2t, t2i = fn(z_t, z_s, temp), fn(z_t.T, z_s.T, temp)
    assert out["kd"].item() == pytest.approx(temp**2 * (i2t + t2i) / 2, rel=1e-10)
    assert out["kd/t2i"].item() == pytest.approx(t2i, rel=1e-10)


def test_kd_teacher_scale_option_replaces_teacher_scale():
    s, t = make_pair(5, 4, 4, seed=3)
    fixed = value(build("kd", 4, 4, teacher_scale=100.0), "kd", s, t)["kd"]
    t100 = t.replace(scale=torch.tensor(100.0, dtype=torch.float64))
    assert fixed.item() == pytest.approx(value(build("kd", 4, 4), "kd", s, t100)["kd"].item(), rel=1e-12)


def test_kd_faithful_differs_by_teacher_entropy_with_identical_gradients():
    s, t = make_pair(6, 3, 5, seed=4)
    clean = value(build("kd", 3, 5), "kd", s, t)["kd"]
    g_clean = torch.autograd.grad(clean, [s.image, s.text, s.scale])
    faithful = value(build("kd", 3, 5, faithful=True), "kd", s, t)["kd"]
    g_faith = torch.autograd.grad(faithful, [s.image, s.text, s.scale])
    z_t = logits(np_(t.image), np_(t.text), 7.0)
    entropy = (soft_ce_mean(z_t, z_t) + soft_ce_mean(z_t.T, z_t.T)) / 2
    assert (faithful - clean).item() == pytest.approx(entropy, rel=1e-10)
    for a, b in zip(g_clean, g_faith):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
@pytest.mark.parametrize("faithful", [False, True])
def test_affinity_matches_loop_reference(d_s, d_t, faithful):
    s, t = make_pair(6, d_s, d_t, seed=5)
    out = value(build("affinity", d_s, d_t, faithful=faithful), "affinity", s, t)
    s_s, s_t = (50.0, 50.0) if faithful else (5.0, 7.0)
    z_s, z_t = logits(np_(s.image), np_(s.text), s_s), logits(np_(t.image), np_(t.text), s_t)
    ref = (soft_ce_mean(z_t, z_s) + soft_ce_mean(z_t.T, z_s.T)) / 2
    assert out["affinity"].item() == pytest.approx(ref, rel=1e-10)


def test_affinity_faithful_gives_no_gradient_to_student_scale():
    s, t = make_pair(5, 4, 4, seed=6)
    loss = value(build("affinity", 4, 4, faithful=True), "affinity", s, t)["affinity"]
    loss.backward()
    assert s.scale.grad is None or s.scale.grad.abs().item() == 0.0
    assert s.image.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name,opts",
    [
        ("clip", {}),
        ("kd", {}),
        ("kd", {"temperature": 2.0, "faithful": True}),
        ("affinity", {}),
        ("affinity", {"faithful": True}),
    ],
)
def test_gradcheck(name, opts):
    s, t = make_pair(4, 3, 5, seed=7, s=2.0, s_t=3.0)
    term = build(name, 3, 5, **opts).terms[name]

    def fn(img, txt, scale):
        return term(Outputs(image=img, text=txt, scale=scale), t)[name]

    assert torch.autograd.gradcheck(fn, (s.image, s.text, s.scale))


@pytest.mark.parametrize(
    "name,opts", [("kd", {}), ("kd", {"temperature": 3.0}), ("affinity", {}), ("crd", {})]
)
def test_minimum_when_student_reproduces_teacher(name, opts):
    _, t = make_pair(6, 4, 4, seed=8)
    student = Outputs(
        image=t.image.clone().requires_grad_(),
        text=t.text.clone().requires_grad_(),
        scale=t.scale.clone().requires_grad_(),
    )
    term = build(name, 4, 4, **opts).terms[name]
    at_teacher = term(student, t)[name]
    grads = torch.autograd.grad(at_teacher, [student.image, student.text, student.scale])
    for g in grads:
        assert g.abs().max().item() < 1e-10
    if name != "affinity":  # KL forms: zero at the teacher
        assert abs(at_teacher.item()) < 1e-12
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        moved = Outputs(
            image=t.image + 0.3 * torch.randn(t.image.shape, generator=g, dtype=torch.float64),
            text=t.text,
            scale=t.scale * 1.2,
        )
        assert term(moved, t)[name].item() > at_teacher.item()


def test_clip_is_symmetric_in_swapping_modalities():
    s, t = make_pair(6, 4, 4, seed=10)
    term = build("clip", 4, 4).terms["clip"]
    swapped = s.replace(image=s.text, text=s.image)
    assert term(s, t)["clip"].item() == pytest.approx(term(swapped, t)["clip"].item(), rel=1e-12)
