"""ensemble_kd (docs/methods.md section 7.1; MobileCLIP): equal to kd with one member, a loop reference,
gradcheck, the minimum where a student can reach it, and ensemble members gathered over 2 gloo ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers.gloo import run_processes
from refs_clip import build, log_softmax, logits, make_pair, np_

from clipdistill.losses import Outputs

WIDTHS = [(5, 5), (3, 5)]


def ensemble(n: int, widths: list[int], scales: list[float], seed: int) -> Outputs:
    """Teacher outputs of an ensemble: members of the given widths and scales (normalised embeddings);
    the teacher's own fields are member 0's."""
    g = torch.Generator().manual_seed(seed)
    members = []
    for d, s in zip(widths, scales):
        image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
        members.append(Outputs(image=image, text=text, scale=torch.tensor(s, dtype=torch.float64)))
    return members[0].replace(members=tuple(members))


def term(d_s: int, d_t: int, name: str = "ensemble_kd", **opts):
    return build(name, d_s, d_t, **opts).terms[name]


# ---- one member is kd -------------------------------------------------------------------------------


@pytest.mark.parametrize("d_s,d_t", WIDTHS)
@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("teacher_scale", [None, 100.0])
def test_one_member_equals_kd_exactly(d_s, d_t, temp, faithful, teacher_scale):
    s, t = make_pair(6, d_s, d_t, seed=2)
    opts = {"temperature": temp, "faithful": faithful, "teacher_scale": teacher_scale}
    kd = term(d_s, d_t, "kd", **opts)(s, t)
    for teacher in (t, t.replace(members=(t,))):  # no members: the teacher is its own single member
        out = term(d_s, d_t, **opts)(s, teacher)
        for key in ("", "/i2t", "/t2i"):
            assert torch.equal(out[f"ensemble_kd{key}"], kd[f"kd{key}"]), key
        grads = torch.autograd.grad(out["ensemble_kd"], [s.image, s.text, s.scale])
        for a, b in zip(grads, torch.autograd.grad(kd["kd"], [s.image, s.text, s.scale], retain_graph=True)):
            assert torch.equal(a, b)


# ---- loop reference ---------------------------------------------------------------------------------


def mixture_rows(zs: list[np.ndarray], temp: float) -> list[list[float]]:
    """P[i][j] = (1/K) sum_k softmax(Z_k[i] / T)[j], by explicit loops."""
    n, m = zs[0].shape
    p = [[0.0] * m for _ in range(n)]
    for z in zs:
        for i in range(n):
            row = [math.exp(v) for v in log_softmax(list(z[i] / temp))]
            for j in range(m):
                p[i][j] += row[j] / len(zs)
    return p


def ref_direction(zs: list[np.ndarray], z_s: np.ndarray, temp: float, faithful: bool) -> float:
    p = mixture_rows(zs, temp)
    total = 0.0
    for i in range(z_s.shape[0]):
        lq = log_softmax(list(z_s[i] / temp))
        for j, pij in enumerate(p[i]):
            total += -pij * lq[j] if faithful else pij * (math.log(pij) - lq[j])
    return total / z_s.shape[0]


@pytest.mark.parametrize("widths,scales", [([5, 3], [7.0, 20.0]), ([4, 6, 2], [3.0, 9.0, 15.0])])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("teacher_scale", [None, 100.0])
def test_matches_loop_reference(widths, scales, temp, faithful, teacher_scale):
    s, _ = make_pair(6, 4, 4, seed=3)
    t = ensemble(6, widths, scales, seed=4)
    opts = {"temperature": temp, "faithful": faithful, "teacher_scale": teacher_scale}
    out = term(4, widths[0], **opts)(s, t)
    z_s = logits(np_(s.image), np_(s.text), 5.0)
    zs = [logits(np_(m.image), np_(m.text), teacher_scale or sc) for m, sc in zip(t.members, scales)]
    i2t = ref_direction(zs, z_s, temp, faithful)
    t2i = ref_direction([z.T for z in zs], z_s.T, temp, faithful)
    assert out["ensemble_kd/i2t"].item() == pytest.approx(i2t, rel=1e-10)
    assert out["ensemble_kd/t2i"].item() == pytest.approx(t2i, rel=1e-10)
    assert out["ensemble_kd"].item() == pytest.approx(temp**2 * (i2t + t2i) / 2, rel=1e-10)


def test_members_are_not_the_chosen_member():
    """The mixture differs from each member's own KD (the term reads `members`, not the top-level fields)."""
    s, _ = make_pair(6, 4, 4, seed=5)
    t = ensemble(6, [4, 4], [10.0, 30.0], seed=6)
    both = term(4, 4)(s, t)["ensemble_kd"].item()
    for m in t.members:
        assert abs(term(4, 4, "kd")(s, m)["kd"].item() - both) > 1e-3


@pytest.mark.parametrize("opts", [{}, {"temperature": 2.0, "faithful": True}, {"teacher_scale": 50.0}])
def test_gradcheck(opts):
    s, _ = make_pair(4, 3, 5, seed=7, s=2.0)
    t = ensemble(4, [5, 2], [3.0, 6.0], seed=8)
    fn_term = term(3, 5, **opts)

    def fn(img, txt, scale):
        return fn_term(Outputs(image=img, text=txt, scale=scale), t)["ensemble_kd"]

    assert torch.autograd.gradcheck(fn, (s.image, s.text, s.scale))


# ---- the minimum ------------------------------------------------------------------------------------


def test_minimum_at_members_that_agree():
    """Members of different widths with the same logits (the second an isometric copy of the first in 7
    dimensions): the mixture is a softmax, and the student that reproduces it is the minimum, loss 0."""
    n, d = 6, 4
    first = ensemble(n, [d], [8.0], seed=9).members[0]
    iso = torch.linalg.qr(torch.randn(7, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[
        0
    ]
    second = Outputs(image=first.image @ iso.T, text=first.text @ iso.T, scale=first.scale)
    t = first.replace(members=(first, second))
    student = Outputs(
        image=first.image.clone().requires_grad_(),
        text=first.text.clone().requires_grad_(),
        scale=first.scale.clone().requires_grad_(),
    )
    loss_term = term(d, d)
    at_teacher = loss_term(student, t)["ensemble_kd"]
    assert abs(at_teacher.item()) < 1e-12
    for g in torch.autograd.grad(at_teacher, [student.image, student.text, student.scale]):
        assert g.abs().max().item() < 1e-10
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        moved = student.replace(image=first.image + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64))
        assert loss_term(moved, t)["ensemble_kd"].item() > 1e-6


def student_with_logits(target: torch.Tensor, scale: float) -> Outputs:
    """A student whose logits `s v^ t^^T` equal `target` (N x N, |target| < scale): texts are the unit
    vectors e_j, image i is [target_i / s ; sqrt(1 - |target_i / s|^2) e_i] (unit norm by construction)."""
    n = target.shape[0]
    head = target / scale
    tail = torch.diag(torch.sqrt(1 - (head**2).sum(1)))
    image = torch.cat([head, tail], dim=1).requires_grad_()
    text = torch.cat([torch.eye(n, dtype=target.dtype), torch.zeros(n, n, dtype=target.dtype)], dim=1)
    return Outputs(image=image, text=text.requires_grad_(), scale=torch.tensor(scale, dtype=target.dtype))


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_each_direction_is_minimal_where_the_student_matches_the_mixture(direction):
    """A mixture of two different members is no single softmax in both directions at once; in one
    direction a student can match it: there that direction's KL is 0 and stationary, and moving the
    student raises it."""
    n = 5
    t = ensemble(n, [4, 6], [6.0, 12.0], seed=10)
    zs = [m.scale * m.image @ m.text.T for m in t.members]
    if direction == "t2i":
        zs = [z.T for z in zs]
    p_log = torch.logsumexp(torch.stack([torch.log_softmax(z, dim=1) for z in zs]), dim=0) - math.log(2)
    target = p_log - p_log.mean(1, keepdim=True)  # log P up to a row constant
    if direction == "t2i":
        target = target.T
    student = student_with_logits(target, scale=40.0)
    loss_term = term(2 * n, 4)
    value = loss_term(student, t)[f"ensemble_kd/{direction}"]
    assert abs(value.item()) < 1e-12
    grad = torch.autograd.grad(value, [student.image])[0]
    assert grad.abs().max().item() < 1e-10
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        moved = student.replace(
            image=student.image + 0.05 * torch.randn(student.image.shape, generator=g, dtype=torch.float64)
        )
        assert loss_term(moved, t)[f"ensemble_kd/{direction}"].item() > 1e-8


# ---- two gloo ranks ---------------------------------------------------------------------------------

WORLD, LOCAL_N = 2, 3


def full_batch() -> tuple[Outputs, Outputs]:
    s, _ = make_pair(WORLD * LOCAL_N, 4, 4, seed=11)
    return s, ensemble(WORLD * LOCAL_N, [4, 6], [6.0, 15.0], seed=12)


def rows_of(out: Outputs, rows: slice) -> Outputs:
    members = tuple(rows_of(m, rows) for m in out.members)
    return out.replace(image=out.image[rows], text=out.text[rows], members=members)


def loss_and_grads(rows: slice) -> dict:
    s_full, t_full = full_batch()
    leaves = {
        k: (getattr(s_full, k) if k == "scale" else getattr(s_full, k)[rows])
        .detach()
        .clone()
        .requires_grad_()
        for k in ("image", "text", "scale")
    }
    distiller = build("ensemble_kd", 4, 4)
    total, _ = distiller(Outputs(**leaves), rows_of(t_full, rows))
    total.backward()
    return {"loss": total.detach(), **{k: v.grad for k, v in leaves.items()}}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(loss_and_grads(slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_the_members_and_equal_one(tmp_path):
    run_processes(_worker, (str(tmp_path / "init"), str(tmp_path)), WORLD)
    single = loss_and_grads(slice(None))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-10, atol=1e-12)
        for key in ("image", "text"):
            torch.testing.assert_close(got[key], single[key][rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["scale"], single["scale"], rtol=1e-9, atol=1e-12)
