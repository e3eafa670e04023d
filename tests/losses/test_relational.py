"""Relational distillation (spec 8): float64 loop reference, gradcheck, invariant, memory bank."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from refs_clip import log_softmax, unit
from term_context import make_ctx

from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.losses.relational import FifoBank, RelationalDistill

pytestmark = pytest.mark.usefixtures("float64")


def make_outputs(n: int, d: int, scale: float, seed: int) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    return Outputs(
        image=torch.randn(n, d, generator=g),
        text=torch.randn(n, d, generator=g),
        scale=torch.tensor(scale),
    )


# ---- independent reference: explicit loops in numpy float64 ------------------------------------


def _kl_row(t_logits: list[float], s_logits: list[float]) -> float:
    lp, lq = log_softmax(t_logits), log_softmax(s_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def ref_relation(sq, sc, tq, tc, mult_t, mult_s, drop_self, bank=None, sq_proj=None) -> float:
    total = 0.0
    for i in range(len(sq)):
        s_row, t_row = [], []
        for j in range(len(sc)):
            if drop_self and i == j:
                continue
            s_row.append(mult_s * float(unit(sq[i]) @ unit(sc[j])))
            t_row.append(mult_t * float(unit(tq[i]) @ unit(tc[j])))
        for b in bank if bank is not None else []:
            s_row.append(mult_s * float(unit(sq_proj[i]) @ b))
            t_row.append(mult_t * float(unit(tq[i]) @ b))
        total += _kl_row(t_row, s_row)
    return total / len(sq)


def ref_total(term, student, teacher, banks=None, keep_self=False, weights=None, taus=(0.04, 0.04)):
    np_s = {m: getattr(student, m).detach().numpy() for m in ("image", "text")}
    np_t = {m: getattr(teacher, m).detach().numpy() for m in ("image", "text")}
    pairs = {
        "i2t": ("image", "text"),
        "t2i": ("text", "image"),
        "i2i": ("image", "image"),
        "t2t": ("text", "text"),
    }
    weights = weights or {"i2t": 1.0, "t2i": 1.0, "i2i": 0.5, "t2t": 0.5}
    out = {}
    for rel, (q, c) in pairs.items():
        if rel not in term.relations:
            continue
        intra = q == c
        mult_t, mult_s = (1 / taus[0], 1 / taus[1]) if intra else (float(teacher.scale), float(student.scale))
        bank, sq_proj = None, None
        if banks is not None and c in banks:
            bank = banks[c]
            proj = term._proj[q]
            if proj is None:
                sq_proj = np_s[q]
            else:
                w, b = proj.weight.detach().numpy(), proj.bias.detach().numpy()
                sq_proj = np.stack([w @ row + b for row in np_s[q]])
        out[rel] = ref_relation(
            np_s[q], np_s[c], np_t[q], np_t[c], mult_t, mult_s, intra and not keep_self, bank, sq_proj
        )
    return sum(weights[r] * v for r, v in out.items()), out


# ---- tests ---------------------------------------------------------------------------------------


def test_batch_only_matches_loop_reference_with_width_mismatch():
    term = RelationalDistill(make_ctx(3, 5), bank_size=0)
    student, teacher = make_outputs(6, 3, 20.0, 1), make_outputs(6, 5, 50.0, 2)
    out = term(student, teacher)
    total, parts = ref_total(term, student, teacher)
    assert set(out) == {"relational", "relational/i2t", "relational/t2i", "relational/i2i", "relational/t2t"}
    for rel, value in parts.items():
        assert out[f"relational/{rel}"].item() == pytest.approx(value, rel=1e-10)
    assert out["relational"].item() == pytest.approx(total, rel=1e-10)


def test_keep_self_and_custom_temperatures_and_subset():
    term = RelationalDistill(
        make_ctx(4, 4), bank_size=0, keep_self=True, relations="i2i,t2t", tau_intra_t=0.1, tau_intra_s=0.2
    )
    student, teacher = make_outputs(5, 4, 10.0, 3), make_outputs(5, 4, 30.0, 4)
    out = term(student, teacher)
    assert set(out) == {"relational", "relational/i2i", "relational/t2t"}
    total, _ = ref_total(term, student, teacher, keep_self=True, taus=(0.1, 0.2))
    assert out["relational"].item() == pytest.approx(total, rel=1e-10)
    dropped, _ = ref_total(term, student, teacher, keep_self=False, taus=(0.1, 0.2))
    assert out["relational"].item() != pytest.approx(dropped, rel=1e-6)


def test_fixed_cross_temperatures():
    term = RelationalDistill(
        make_ctx(3, 3), bank_size=0, relations=["i2t"], tau_cross_t=0.5, tau_cross_s=0.25
    )
    student, teacher = make_outputs(4, 3, 10.0, 5), make_outputs(4, 3, 30.0, 6)
    expected = ref_relation(
        student.image.numpy(),
        student.text.numpy(),
        teacher.image.numpy(),
        teacher.text.numpy(),
        2.0,
        4.0,
        False,
    )
    assert term(student, teacher)["relational/i2t"].item() == pytest.approx(expected, rel=1e-10)


def test_bank_candidates_use_projector_and_teacher_space():
    term = RelationalDistill(make_ctx(3, 5), bank_size=16)
    history = make_outputs(7, 5, 50.0, 7)
    term.update(None, history)
    student, teacher = make_outputs(4, 3, 20.0, 8), make_outputs(4, 5, 50.0, 9)
    out = term(student, teacher)
    banks = {m: np.stack([unit(r) for r in getattr(history, m).numpy()]) for m in ("image", "text")}
    total, parts = ref_total(term, student, teacher, banks=banks)
    for rel, value in parts.items():
        assert out[f"relational/{rel}"].item() == pytest.approx(value, rel=1e-10)
    batch_only, _ = ref_total(term, student, teacher)
    assert out["relational"].item() == pytest.approx(total, rel=1e-10)
    assert out["relational"].item() != pytest.approx(batch_only, rel=1e-6)


def test_bank_is_masked_until_filled():
    term = RelationalDistill(make_ctx(3, 5), bank_size=8, relations=["i2t"])
    history = make_outputs(3, 5, 50.0, 10)
    term.update(None, history)
    assert int(term.banks["text"].count) == 3 and term.banks["text"].valid().shape == (3, 5)
    student, teacher = make_outputs(4, 3, 20.0, 11), make_outputs(4, 5, 50.0, 12)
    value = term(student, teacher)["relational"].item()
    valid = np.stack([unit(r) for r in history.text.numpy()])
    expected, _ = ref_total(term, student, teacher, banks={"text": valid})
    assert value == pytest.approx(expected, rel=1e-10)
    # The unfilled (zero) rows would be candidates with cosine 0 if they were not masked.
    with_zeros, _ = ref_total(
        term, student, teacher, banks={"text": np.concatenate([valid, np.zeros((5, 5))])}
    )
    assert value != pytest.approx(with_zeros, rel=1e-6)


def test_current_batch_is_never_its_own_candidate():
    term = RelationalDistill(make_ctx(3, 5), bank_size=32)
    student, teacher = make_outputs(4, 3, 20.0, 13), make_outputs(4, 5, 50.0, 14)
    first = term(student, teacher)["relational"].item()
    again = term(student, teacher)["relational"].item()
    assert int(term.banks["image"].count) == 0 and int(term.banks["text"].count) == 0
    batch_only, _ = ref_total(term, student, teacher)
    assert first == pytest.approx(batch_only, rel=1e-10) and again == first
    term.update(student, teacher)  # after the loss: enqueued for the next step
    assert int(term.banks["image"].count) == 4
    assert torch.allclose(term.banks["image"].valid(), torch.nn.functional.normalize(teacher.image, dim=-1))


def test_fifo_order_wrap_and_oversized_batch():
    bank = FifoBank(5, 2)
    rows = torch.arange(24.0).view(12, 2)
    bank.enqueue(rows[:3])
    assert torch.equal(bank.ordered(), rows[:3])
    bank.enqueue(rows[3:7])  # wraps: 7 rows seen, the last 5 kept
    assert int(bank.count) == 5 and int(bank.ptr) == 2
    assert torch.equal(bank.ordered(), rows[2:7])
    bank.enqueue(rows[7:])  # a batch larger than the bank keeps its last 5 rows
    assert torch.equal(bank.ordered(), rows[7:12])


def test_state_dict_round_trip():
    ctx = make_ctx(3, 5)
    term = RelationalDistill(ctx, bank_size=6)
    for seed in (20, 21, 22):
        term.update(None, make_outputs(4, 5, 50.0, seed))
    state = term.state_dict()
    assert {"banks.image.entries", "banks.image.ptr", "banks.image.count", "banks.text.entries"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = RelationalDistill(ctx, bank_size=6)
    restored.load_state_dict(torch.load(buf))
    for m in ("image", "text"):
        assert torch.equal(restored.banks[m].ordered(), term.banks[m].ordered())
        assert int(restored.banks[m].ptr) == int(term.banks[m].ptr) == 0
    student, teacher = make_outputs(4, 3, 20.0, 23), make_outputs(4, 5, 50.0, 24)
    assert restored(student, teacher)["relational"].item() == term(student, teacher)["relational"].item()


def test_gradcheck_with_bank_and_width_mismatch():
    term = RelationalDistill(make_ctx(3, 4), bank_size=3)
    term.update(None, make_outputs(2, 4, 50.0, 30))
    teacher = make_outputs(3, 4, 40.0, 31)
    s = make_outputs(3, 3, 5.0, 32)
    inputs = (s.image.requires_grad_(), s.text.requires_grad_(), s.scale.requires_grad_())

    def fn(img, txt, scale):
        return term(Outputs(image=img, text=txt, scale=scale), teacher)["relational"]

    assert torch.autograd.gradcheck(fn, inputs)


def test_minimum_when_student_reproduces_teacher():
    term = RelationalDistill(make_ctx(4, 4), bank_size=8, allow_shared_space=True)
    term.update(None, make_outputs(5, 4, 30.0, 40))
    teacher = make_outputs(6, 4, 30.0, 41)
    student = Outputs(
        image=teacher.image.clone().requires_grad_(), text=teacher.text.clone(), scale=teacher.scale.clone()
    )
    loss = term(student, teacher)["relational"]
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, student.image)
    assert grad.abs().max().item() < 1e-10
    noisy = student.replace(image=teacher.image + 0.1 * torch.randn_like(teacher.image))
    assert term(noisy, teacher)["relational"].item() > 1e-4


def test_equal_widths_need_a_projector_or_shared_space():
    with pytest.raises(UserError, match="allow_shared_space"):
        RelationalDistill(make_ctx(4, 4), bank_size=8)
    RelationalDistill(make_ctx(4, 4), bank_size=0)  # batch-only needs no projector
    own = RelationalDistill(make_ctx(4, 4), bank_size=8, own_projector=True)
    assert torch.equal(own.own["image"].weight, torch.eye(4))
    assert {name for name, _ in own.named_parameters()} >= {"own.image.weight", "own.text.bias"}


def test_bad_options():
    with pytest.raises(UserError, match="unknown relation 'x2t'"):
        RelationalDistill(make_ctx(3, 5), relations=["x2t"])
    with pytest.raises(UserError, match="bank_size"):
        RelationalDistill(make_ctx(3, 5), bank_size=-1)
    with pytest.raises(UserError, match="tau_intra_s"):
        RelationalDistill(make_ctx(3, 5), tau_intra_s=0)
