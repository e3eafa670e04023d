"""siglip and sigmoid_kd (spec 14): float64 loop references, gradcheck, the minimum at the teacher, the
student's bias and its fallback, 2 gloo processes against one, and the bias cancelling in softmax terms."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers.gloo import run_processes
from refs_clip import kl_mean, logits, np_

from clipdistill.errors import UserError
from clipdistill.losses import Distiller, Outputs, parse_loss_config
from clipdistill.losses._functional import symmetric_kl

F64 = torch.float64


def make(n: int, d_s: int, d_t: int, seed: int, *, bias: float | None = -2.0) -> tuple[Outputs, Outputs]:
    """Random float64 student (leaves with grad, bias `bias` or None) and teacher (scale 8, bias -3)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).requires_grad_()

    student = Outputs(
        image=leaf(n, d_s),
        text=leaf(n, d_s),
        scale=torch.tensor(5.0, dtype=F64).requires_grad_(),
        bias=None if bias is None else torch.tensor(bias, dtype=F64).requires_grad_(),
    )
    teacher = Outputs(
        image=torch.randn(n, d_t, generator=g, dtype=F64),
        text=torch.randn(n, d_t, generator=g, dtype=F64),
        scale=torch.tensor(8.0, dtype=F64),
        bias=torch.tensor(-3.0, dtype=F64),
    )
    return student, teacher


def term(name: str, d_s: int = 4, d_t: int = 4, **opts):
    """The term as a Distiller builds it (its projectors included), in float64."""
    torch.manual_seed(0)
    return Distiller(parse_loss_config({name: {"weight": 1.0, **opts}}), d_s, d_t).double().terms[name]


# ---- float64 loop references (numpy rows, math on Python floats) ------------------------------


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def siglip_ref(img: np.ndarray, txt: np.ndarray, scale: float, bias: float) -> tuple[float, float, float]:
    """(loss, positives' part, negatives' part): -sum_ij log sigmoid(z_ij l_ij) / N, pair by pair."""
    z = logits(img, txt, scale)
    n = z.shape[0]
    pos = neg = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                pos -= log_sigmoid(z[i, j] + bias)
            else:
                neg -= log_sigmoid(-(z[i, j] + bias))
    return (pos + neg) / n, pos / n, neg / n


def sigmoid_kd_ref(s: Outputs, t: Outputs, b_s: float, b_t: float) -> tuple[float, float]:
    """(mean binary cross-entropy, mean binary KL) over all pairs."""
    z_s = logits(np_(s.image), np_(s.text), s.scale.item())
    z_t = logits(np_(t.image), np_(t.text), t.scale.item())
    n = z_s.shape[0]
    bce = kl = 0.0
    for i in range(n):
        for j in range(n):
            p = 1 / (1 + math.exp(-(z_t[i, j] + b_t)))
            q = 1 / (1 + math.exp(-(z_s[i, j] + b_s)))
            bce -= p * math.log(q) + (1 - p) * math.log(1 - q)
            kl += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    return bce / n / n, kl / n / n


# ---- siglip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_bias", [-2.0, None])
def test_siglip_matches_loop_reference(student_bias):
    s, _ = make(6, 4, 4, seed=1, bias=student_bias)
    loss = term("siglip")
    out = loss(s, None)
    b = -10.0 if student_bias is None else student_bias  # the fallback starts at SigLIP's -10
    ref, pos, neg = siglip_ref(np_(s.image), np_(s.text), 5.0, b)
    assert out["siglip"].item() == pytest.approx(ref, rel=1e-10)
    assert out["siglip/pos"].item() == pytest.approx(pos, rel=1e-10)
    assert out["siglip/neg"].item() == pytest.approx(neg, rel=1e-10)


def test_siglip_equals_open_clip_siglip_loss():
    from open_clip.loss import SigLipLoss

    s, _ = make(7, 5, 5, seed=2)
    ours = term("siglip", 5, 5)(s, None)["siglip"]
    theirs = SigLipLoss()(s.image_n, s.text_n, s.scale, s.bias)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)


def test_siglip_gradcheck():
    s, _ = make(4, 3, 3, seed=3)
    loss = term("siglip", 3, 3)

    def fn(img, txt, scale, bias):
        return loss(Outputs(image=img, text=txt, scale=scale, bias=bias), None)["siglip"]

    assert torch.autograd.gradcheck(fn, (s.image, s.text, s.scale, s.bias))


def test_siglip_uses_the_students_bias_and_otherwise_a_learnable_fallback():
    s, _ = make(5, 4, 4, seed=4)
    loss = term("siglip")
    base = loss(s, None)["siglip"]
    moved = loss(s.replace(bias=s.bias.detach() + 1.0), None)["siglip"]
    assert abs(moved.item() - base.item()) > 1e-3  # the bias is used
    base.backward()
    assert s.bias.grad is not None and s.bias.grad.abs() > 0
    assert loss.logit_bias.grad is None  # the student's own bias replaces the fallback
    unbiased = loss(s.replace(bias=None), None)["siglip"]
    unbiased.backward()
    assert loss.logit_bias.item() == -10.0 and loss.logit_bias.grad.abs() > 0


def test_sigmoid_terms_share_one_fallback_bias():
    cfg = parse_loss_config({"siglip": 1.0, "sigmoid_kd": 1.0})
    distiller = Distiller(cfg, 4, 4).double()
    names = [n for n, _ in distiller.named_parameters()]
    assert names == ["terms.siglip.logit_bias"]
    s, t = make(5, 4, 4, seed=5, bias=None)
    total, logs = distiller(s, t)
    total.backward()
    shared = distiller.terms["siglip"].logit_bias
    g_siglip = torch.autograd.grad(distiller.terms["siglip"](s, t)["siglip"], shared)[0]
    g_kd = torch.autograd.grad(distiller.terms["sigmoid_kd"](s, t)["sigmoid_kd"], shared)[0]
    torch.testing.assert_close(shared.grad, g_siglip + g_kd)
    assert g_kd.abs() > 0


def test_siglip_refuses_bad_inputs():
    s, _ = make(4, 3, 3, seed=6)
    loss = term("siglip", 3, 3)
    with pytest.raises(UserError, match="needs image and text"):
        loss(s.replace(text=None), None)
    with pytest.raises(UserError, match="4 images and 3 texts"):
        loss(s.replace(text=s.text[:3]), None)
    with pytest.raises(UserError, match="single number"):
        loss(s.replace(bias=torch.zeros(2, dtype=F64)), None)
    with pytest.raises(UserError, match="has no option"):
        parse_loss_config({"siglip": {"init_bias": -5}})


# ---- sigmoid_kd --------------------------------------------------------------------------------


@pytest.mark.parametrize("d_s,d_t", [(4, 4), (3, 5)])
@pytest.mark.parametrize("student_bias", [-2.0, None])
def test_sigmoid_kd_matches_loop_reference(d_s, d_t, student_bias):
    s, t = make(5, d_s, d_t, seed=7, bias=student_bias)
    out = term("sigmoid_kd", d_s, d_t)(s, t)
    b_s = -10.0 if student_bias is None else student_bias
    bce, kl = sigmoid_kd_ref(s, t, b_s, -3.0)
    assert out["sigmoid_kd"].item() == pytest.approx(bce, rel=1e-10)
    assert out["sigmoid_kd/kl"].item() == pytest.approx(kl, rel=1e-9, abs=1e-12)


def test_sigmoid_kd_gradcheck_and_no_teacher_gradient():
    s, t = make(4, 3, 5, seed=8)
    t = t.replace(image=t.image.clone().requires_grad_(), bias=t.bias.clone().requires_grad_())
    loss = term("sigmoid_kd", 3, 5)

    def fn(img, txt, scale, bias):
        return loss(Outputs(image=img, text=txt, scale=scale, bias=bias), t)["sigmoid_kd"]

    assert torch.autograd.gradcheck(fn, (s.image, s.text, s.scale, s.bias))
    loss(s, t)["sigmoid_kd"].backward()
    assert t.image.grad is None and t.bias.grad is None


def test_sigmoid_kd_is_minimal_at_the_teacher():
    """A student whose pair logits equal the teacher's, in a wider space (an isometry d_t -> d_s)."""
    _, t = make(6, 4, 4, seed=9)
    q = torch.linalg.qr(torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=F64))[0]
    loss = term("sigmoid_kd", 7, 4)

    def student(img, txt, scale, bias):
        return Outputs(image=img, text=txt, scale=scale, bias=bias)

    leaves = [
        (t.image @ q.T).requires_grad_(),
        (t.text @ q.T).requires_grad_(),
        t.scale.clone().requires_grad_(),
        t.bias.clone().requires_grad_(),
    ]
    out = loss(student(*leaves), t)
    grads = torch.autograd.grad(out["sigmoid_kd"], leaves)
    for g in grads:
        assert g.abs().max() < 1e-12
    assert abs(out["sigmoid_kd/kl"].item()) < 1e-12
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        moved = [(x + 0.05 * torch.randn(x.shape, generator=g, dtype=F64)).detach() for x in leaves]
        assert loss(student(*moved), t)["sigmoid_kd"] > out["sigmoid_kd"]


def test_sigmoid_kd_uses_the_teacher_bias_and_the_option():
    s, t = make(5, 4, 4, seed=10)
    base = term("sigmoid_kd")(s, t)["sigmoid_kd"]
    moved = term("sigmoid_kd")(s, t.replace(bias=t.bias + 1.0))["sigmoid_kd"]
    assert abs(moved.item() - base.item()) > 1e-3
    fixed = term("sigmoid_kd", teacher_bias=-2.0)(s, t)["sigmoid_kd"]
    assert fixed.item() == pytest.approx(sigmoid_kd_ref(s, t, -2.0, -2.0)[0], rel=1e-10)
    for bad in ("x", float("nan"), True):
        with pytest.raises(UserError, match="teacher_bias"):
            term("sigmoid_kd", teacher_bias=bad)


def test_sigmoid_kd_reads_a_teacher_without_bias_as_zero_and_warns(caplog):
    s, t = make(5, 4, 4, seed=11)
    loss = term("sigmoid_kd")
    with caplog.at_level(logging.WARNING, logger="clipdistill.losses.siglip"):
        out = loss(s, t.replace(bias=None))["sigmoid_kd"]
        loss(s, t.replace(bias=None))
    assert out.item() == pytest.approx(sigmoid_kd_ref(s, t, -2.0, 0.0)[0], rel=1e-10)
    assert len([r for r in caplog.records if "no logit bias" in r.message]) == 1


# ---- softmax terms ignore the teacher's bias ---------------------------------------------------


@pytest.mark.parametrize(
    "name,opts",
    [
        ("kd", {}),
        ("kd", {"temperature": 2.0}),
        ("crd", {}),
        ("affinity", {}),
        ("icl", {}),
        ("relational", {"bank_size": 0}),
    ],
)
def test_softmax_terms_ignore_the_teacher_bias(name, opts):
    s, t = make(6, 3, 5, seed=12)
    loss = term(name, 3, 5, **opts)
    with_bias = loss(s, t)[name]
    without = loss(s, t.replace(bias=None))[name]
    assert with_bias.item() == pytest.approx(without.item(), rel=1e-12)


def test_a_constant_bias_cancels_in_the_row_softmax_of_kd():
    """kd ignores `teacher.bias`; using it would give the same value, row by row and column by column."""
    s, t = make(6, 3, 5, seed=13)
    kd = term("kd", 3, 5)(s, t)["kd"]
    z_t = t.scale * t.image_n @ t.text_n.T
    z_s = s.scale * s.image_n @ s.text_n.T
    for dim in (0, 1):
        torch.testing.assert_close(
            torch.softmax(z_t + t.bias, dim), torch.softmax(z_t, dim), rtol=1e-14, atol=0
        )
    i2t, t2i = symmetric_kl(z_t + t.bias, z_s)
    assert ((i2t + t2i) / 2).item() == pytest.approx(kd.item(), rel=1e-12)
    z_np = logits(np_(t.image), np_(t.text), 8.0)
    z_s_np = logits(np_(s.image), np_(s.text), 5.0)
    ref = (kl_mean(z_np - 3.0, z_s_np) + kl_mean(z_np.T - 3.0, z_s_np.T)) / 2
    assert kd.item() == pytest.approx(ref, rel=1e-10)


# ---- two gloo processes equal one --------------------------------------------------------------

WORLD, LOCAL_N, D_S, D_T, STEPS = 2, 3, 4, 6, 2
CASES = {"student_bias": -1.5, "fallback": None}


def full_batch(step: int, bias: float | None) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(200 + step)
    n = WORLD * LOCAL_N
    student = {
        "image": torch.randn(n, D_S, generator=g, dtype=F64),
        "text": torch.randn(n, D_S, generator=g, dtype=F64),
        "scale": torch.tensor(4.0 + step, dtype=F64),
    }
    if bias is not None:
        student["bias"] = torch.tensor(bias - step, dtype=F64)
    teacher = {
        "image": torch.randn(n, D_T, generator=g, dtype=F64),
        "text": torch.randn(n, D_T, generator=g, dtype=F64),
        "scale": torch.tensor(9.0, dtype=F64),
        "bias": torch.tensor(-4.0, dtype=F64),
    }
    return student, teacher


def run_case(bias: float | None, rows: slice) -> list[dict]:
    torch.manual_seed(0)
    distiller = Distiller(parse_loss_config({"siglip": 1.0, "sigmoid_kd": 0.5}), D_S, D_T).double()
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    records = []
    for step in range(STEPS):
        s_full, t_full = full_batch(step, bias)
        leaves = {k: (v if v.ndim == 0 else v[rows]).clone().requires_grad_() for k, v in s_full.items()}
        teacher = Outputs(**{k: v if v.ndim == 0 else v[rows] for k, v in t_full.items()})
        total, logs = distiller(Outputs(**leaves), teacher)
        total.backward()
        records.append(
            {
                "loss": total.detach(),
                "logs": {k: v for k, v in logs.items() if k != "loss"},
                "inputs": {k: v.grad for k, v in leaves.items()},
                "params": {k: p.grad.clone() for k, p in distiller.named_parameters() if p.grad is not None},
            }
        )
        opt.step()  # the fallback bias moves between steps, identically on every rank
        opt.zero_grad()
    return records


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
        torch.save({case: run_case(b, rows) for case, b in CASES.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("siglip_gloo")
    run_processes(_worker, (str(tmp / "init"), str(tmp)), WORLD)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    single = {case: run_case(b, slice(None)) for case, b in CASES.items()}
    return ranks, single


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gloo_processes_equal_one_process(gloo_results, case):
    ranks, single = gloo_results
    for step in range(STEPS):
        ref = single[case][step]
        for rank, per_rank in enumerate(ranks):
            got = per_rank[case][step]
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-12, atol=1e-14)
            for key, value in got["logs"].items():
                torch.testing.assert_close(value, ref["logs"][key], rtol=1e-12, atol=1e-14, msg=key)
            rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
            assert set(got["inputs"]) == set(ref["inputs"])
            for key, grad in got["inputs"].items():
                expect = ref["inputs"][key] if grad.ndim == 0 else ref["inputs"][key][rows]
                torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-13, msg=f"d/d{key} rank {rank}")
            assert set(got["params"]) == set(ref["params"])
            for key, grad in got["params"].items():
                torch.testing.assert_close(grad, ref["params"][key], rtol=1e-10, atol=1e-13, msg=key)
    assert ("bias" in single[case][0]["inputs"]) == (CASES[case] is not None)
    assert bool(single[case][0]["params"]) == (CASES[case] is None)  # the fallback only without a bias
