"""ComKD-CLIP terms (spec 5): ifalign, eduattention, comkd_kl against float64 loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from refs_clip import log_softmax, unit
from term_context import make_ctx
from torch import nn
from torch.func import functional_call

from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.losses.comkd import ComKDKL, EduAttention, EduAttentionTask, IFAlign

pytestmark = pytest.mark.usefixtures("float64")


def make_outputs(n: int, d: int, scale: float, seed: int) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    return Outputs(
        image=torch.randn(n, d, generator=g), text=torch.randn(n, d, generator=g), scale=torch.tensor(scale)
    )


# ---- references (loops, numpy float64) ----------------------------------------------------------


def _linear(layer, v):
    return layer.weight.detach().numpy() @ v + layer.bias.detach().numpy()


def _proj(term, v):
    proj = term._proj["image"]
    return v if proj is None else _linear(proj, v)


def ref_ifalign(term, student, teacher):
    u_s = np.stack([_proj(term, v) for v in student.image.detach().numpy()])
    u_t = teacher.image.numpy()
    n, d = u_t.shape
    total = 0.0
    for k in range(d):
        mu_s, mu_t = sum(u_s[:, k]) / n, sum(u_t[:, k]) / n
        var_s = sum((x - mu_s) ** 2 for x in u_s[:, k]) / n
        var_t = sum((x - mu_t) ** 2 for x in u_t[:, k]) / n
        total += abs(mu_s - mu_t) + abs(var_s - var_t)
    return total / d


def ref_fused(term, student, teacher):
    edu = term.edu
    w = [unit(v) for v in teacher.text.numpy()]
    keys = [_linear(edu.fc_k, v) for v in w]
    values = [_linear(edu.fc_v, v) for v in w]
    alpha = float(edu.alpha.detach())
    fused = []
    for u in student.image.detach().numpy():
        q = _linear(edu.fc_q, u)
        a = [math.exp(x) for x in log_softmax([float(q @ k) / edu.divisor for k in keys])]
        f_att = sum(a_j * v_j for a_j, v_j in zip(a, values))
        fused.append(unit(_proj(term, u) + alpha * f_att))
    return fused, w


def ref_comkd_kl(term, student, teacher, temp):
    fused, w = ref_fused(term, student, teacher)
    s, s_t = float(student.scale), float(teacher.scale)
    total = 0.0
    for i, f in enumerate(fused):
        u_t = unit(teacher.image.numpy()[i])
        lp = log_softmax([s_t * float(u_t @ wj) / temp for wj in w])
        lq = log_softmax([s * float(f @ wj) / temp for wj in w])
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    return temp * temp * total / len(fused)


def ref_eduattention(term, student, teacher):
    fused, w = ref_fused(term, student, teacher)
    s, n = float(student.scale), len(fused)
    z = [[s * float(fused[i] @ w[j]) for j in range(n)] for i in range(n)]
    a = -sum(log_softmax(z[i])[i] for i in range(n)) / n
    b = -sum(log_softmax([z[j][i] for j in range(n)])[i] for i in range(n)) / n
    return (a + b) / 2


def _perturb_edu(edu: EduAttention, alpha: float = 0.7) -> None:
    with torch.no_grad():
        edu.alpha.fill_(alpha)


# ---- ifalign ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_s", [3, 5])
def test_ifalign_matches_reference(d_s):
    term = IFAlign(make_ctx(d_s, 5))
    student, teacher = make_outputs(6, d_s, 1.0, 1), make_outputs(6, 5, 1.0, 2)
    out = term(student, teacher)
    assert out["ifalign"].item() == pytest.approx(ref_ifalign(term, student, teacher), rel=1e-10)
    assert out["ifalign"].item() == pytest.approx(out["ifalign/mean"].item() + out["ifalign/var"].item())


def test_ifalign_gradcheck_and_minimum_at_teacher():
    term = IFAlign(make_ctx(3, 4))
    teacher = make_outputs(5, 4, 1.0, 3)
    img = make_outputs(5, 3, 1.0, 4).image.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: term(teacher.replace(image=x), teacher)["ifalign"], (img,))
    same = IFAlign(make_ctx(4, 4))
    assert same(teacher, teacher)["ifalign"].item() == pytest.approx(0.0, abs=1e-14)
    noisy = teacher.replace(image=teacher.image + 0.1 * torch.randn(5, 4))
    assert same(noisy, teacher)["ifalign"].item() > 1e-3


# ---- EduAttention and comkd_kl ---------------------------------------------------------------------


@pytest.mark.parametrize("d_s", [3, 5])
def test_comkd_kl_matches_reference(d_s):
    term = ComKDKL(make_ctx(d_s, 5), temperature=2.0, attn_dim=4)
    _perturb_edu(term.edu)
    student, teacher = make_outputs(6, d_s, 8.0, 5), make_outputs(6, 5, 30.0, 6)
    out = term(student, teacher)
    assert out["comkd_kl"].item() == pytest.approx(ref_comkd_kl(term, student, teacher, 2.0), rel=1e-10)
    assert out["comkd_kl/alpha"].item() == pytest.approx(0.7)


def test_eduattention_alpha_starts_at_zero_and_layer_shapes():
    term = ComKDKL(make_ctx(3, 5), attn_dim=4)
    edu = term.edu
    assert float(edu.alpha.detach()) == 0.0 and edu.divisor == pytest.approx(2.0)
    assert (
        edu.fc_q.weight.shape == (4, 3)
        and edu.fc_k.weight.shape == (4, 5)
        and edu.fc_v.weight.shape == (5, 5)
    )
    assert ComKDKL(make_ctx(3, 5), divisor=7.0).edu.divisor == 7.0


def test_comkd_kl_gradcheck_inputs_and_eduattention():
    term = ComKDKL(make_ctx(3, 4), temperature=1.5, attn_dim=2)
    teacher = make_outputs(4, 4, 20.0, 7)
    s = make_outputs(4, 3, 5.0, 8)
    img, scale = s.image.requires_grad_(), s.scale.requires_grad_()
    alpha = torch.tensor(0.5, requires_grad=True)
    fc_q = term.edu.fc_q.weight.detach().clone().requires_grad_()

    def fn(img, scale, alpha, fc_q):
        params = {"eduattention.alpha": alpha, "eduattention.fc_q.weight": fc_q}
        return functional_call(term, params, (Outputs(image=img, text=None, scale=scale), teacher))[
            "comkd_kl"
        ]

    assert torch.autograd.gradcheck(fn, (img, scale, alpha, fc_q))


def test_comkd_kl_minimum_at_teacher():
    term = ComKDKL(make_ctx(4, 4))
    teacher = make_outputs(6, 4, 25.0, 9)
    student = teacher.replace(image=teacher.image.clone().requires_grad_())
    loss = term(student, teacher)["comkd_kl"]
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, student.image)
    assert grad.abs().max().item() < 1e-10
    noisy = teacher.replace(image=teacher.image + 0.2 * torch.randn(6, 4))
    assert term(noisy, teacher)["comkd_kl"].item() > 1e-4


def test_eduattention_term_matches_reference_and_gradcheck():
    term = EduAttentionTask(make_ctx(3, 5), attn_dim=3)
    _perturb_edu(term.edu, -0.4)
    student, teacher = make_outputs(5, 3, 6.0, 10), make_outputs(5, 5, 30.0, 11)
    out = term(student, teacher)
    assert out["eduattention"].item() == pytest.approx(ref_eduattention(term, student, teacher), rel=1e-10)
    img = student.image.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: term(student.replace(image=x), teacher)["eduattention"], (img,))


def test_no_gradient_reaches_the_teacher():
    term = ComKDKL(make_ctx(3, 4))
    _perturb_edu(term.edu)
    teacher = make_outputs(4, 4, 20.0, 12)
    t_img, t_txt = teacher.image.requires_grad_(), teacher.text.requires_grad_()
    student = make_outputs(4, 3, 5.0, 13)
    term(student.replace(image=student.image.requires_grad_()), teacher)["comkd_kl"].backward()
    assert t_img.grad is None and t_txt.grad is None


# ---- sharing one EduAttention between the two terms ------------------------------------------------


@pytest.mark.parametrize("first", ["eduattention", "comkd_kl"])
def test_terms_share_one_eduattention(first):
    ctx = make_ctx(3, 5)
    classes = {"eduattention": EduAttentionTask, "comkd_kl": ComKDKL}
    order = [first, *(n for n in classes if n != first)]
    terms = nn.ModuleDict({name: classes[name](ctx) for name in order})
    assert terms["eduattention"].edu is terms["comkd_kl"].edu
    edu_params = sum(p.numel() for p in terms[first].edu.parameters())
    assert sum(p.numel() for p in terms.parameters()) == edu_params  # projector not owned, edu once
    assert [k for k in terms.state_dict() if k.endswith("alpha")] == [f"{first}.eduattention.alpha"]
    other = order[1]
    assert list(terms[other].parameters()) == []
    student, teacher = make_outputs(4, 3, 6.0, 14), make_outputs(4, 5, 30.0, 15)
    before = terms[other](student, teacher)[other].item()
    _perturb_edu(terms[first].edu)
    assert terms[other](student, teacher)[other].item() != pytest.approx(before, rel=1e-6)


def test_shared_eduattention_options_must_agree():
    ctx = make_ctx(3, 5)
    EduAttentionTask(ctx, attn_dim=4)
    ComKDKL(ctx, attn_dim=4, divisor=2.0)  # sqrt(4) == 2: same module config
    with pytest.raises(UserError, match="set the same values on both"):
        ComKDKL(ctx, attn_dim=3)
