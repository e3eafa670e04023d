"""Two gloo processes on CPU: every registered term through the Distiller, with features gathered
across ranks (local slice keeps its gradient), equals the single-process term on the concatenated
batch, in value and in the gradients of both ranks' inputs and of the Distiller's parameters (spec 0).

Generic over `losses.TERMS`: a term is covered when synthetic `Outputs` meet its needs and it builds
from `TERM_OPTIONS` (or its defaults). Two steps with `update()` in between exercise memory banks.
One 2-process launch runs every term; the parametrised tests read its results.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipdistill.errors import UserError
from clipdistill.losses import TERMS, Distiller, Outputs, parse_loss_config
from clipdistill.losses.base import NEEDS

WORLD, LOCAL_N, D_S, D_T, STEPS = 2, 3, 4, 6, 2
# What synthetic outputs provide (every field and the extras terms read are filled in below).
SYNTHETIC_NEEDS = set(NEEDS)
TERM_OPTIONS = {
    "cluster": {"centres_array": np.linalg.qr(np.random.default_rng(0).normal(size=(D_T, 4)))[0].T},
    "relational": {"bank_size": 8},
}


def full_batch(step: int) -> tuple[dict, dict]:
    """Deterministic float64 tensors for the concatenated batch of WORLD * LOCAL_N samples."""
    g = torch.Generator().manual_seed(100 + step)
    n = WORLD * LOCAL_N

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    student = {
        "image": r(n, D_S),
        "text": r(n, D_S),
        "image_masked": r(n, D_S),
        "image_pooled": r(n, 5),
        "image_tokens": r(n, 3, 5),
        "scale": torch.tensor(4.0 + step, dtype=torch.float64),
    }
    teacher = {
        "image": r(n, D_T),
        "text": r(n, D_T),
        "image_pooled": r(n, 7),
        "image_tokens": r(n, 3, 7),
        "text_tokens": r(n, 4, 7),
        "text_mask": torch.rand(n, 4, generator=g) > 0.3,
        "labels": torch.randint(0, 4, (n,), generator=g),
        "scale": torch.tensor(6.0, dtype=torch.float64),
        "extra": {"image_enriched": r(n, D_T), "text_enriched": r(n, D_T)},
    }
    teacher["text_mask"][:, 0] = True
    return student, teacher


def make_outputs(
    student: dict, teacher: dict, rows: slice
) -> tuple[Outputs, dict[str, torch.Tensor], Outputs]:
    leaves = {k: (v if k == "scale" else v[rows]).clone().requires_grad_() for k, v in student.items()}
    t = {k: v if k in ("scale", "extra") else v[rows] for k, v in teacher.items()}
    t["extra"] = {k: v[rows] for k, v in teacher["extra"].items()}
    return Outputs(**leaves), leaves, Outputs(**t)


def build(name: str) -> Distiller:
    torch.manual_seed(0)
    spec = {name: {"weight": 1.0, **TERM_OPTIONS.get(name, {})}}
    return Distiller(parse_loss_config(spec), D_S, D_T, student_pooled_dim=5, teacher_pooled_dim=7).double()


def run_term(name: str, rows: slice) -> list[dict]:
    """Per step: the loss, the gradients of the given rows' inputs and of the Distiller's parameters."""
    distiller = build(name)
    records = []
    for step in range(STEPS):
        s_full, t_full = full_batch(step)
        student, leaves, teacher = make_outputs(s_full, t_full, rows)
        total, _ = distiller(student, teacher)
        total.backward()
        records.append(
            {
                "loss": total.detach(),
                "inputs": {k: v.grad for k, v in leaves.items() if v.grad is not None},
                "params": {k: p.grad.clone() for k, p in distiller.named_parameters() if p.grad is not None},
            }
        )
        distiller.zero_grad()
        distiller.update(student.detach(), teacher)
    return records


def coverable_terms() -> list[str]:
    names = []
    for name in sorted(TERMS):
        if TERMS[name].needs <= SYNTHETIC_NEEDS:
            try:
                build(name)
            except UserError:  # needs options that the test does not know how to fill
                continue
            names.append(name)
    return names


def _worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
        torch.save({name: run_term(name, rows) for name in names}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    names = coverable_terms()
    tmp = tmp_path_factory.mktemp("gloo")
    # fork: the children inherit the imported modules (spawn re-imports torch and the terms for seconds)
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp), names), nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the 2-process gloo run did not finish in 180 s")
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: run_term(name, slice(None)) for name in names}
    finally:
        torch.set_num_threads(threads)
    return names, ranks, single


def test_covers_the_published_terms(results):
    names, _, _ = results
    mine = {"clip", "kd", "crd", "fd", "mfd", "gd", "icl", "afd", "affinity"}
    assert mine <= set(names)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_distributed_equals_single_process(results, name):
    names, ranks, single = results
    if name not in names:
        pytest.skip(f"synthetic outputs cannot drive term '{name}'")
    for step in range(STEPS):
        ref = single[name][step]
        for rank, per_rank in enumerate(ranks):
            got = per_rank[name][step]
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
            rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
            assert set(got["inputs"]) == set(ref["inputs"]), f"step {step} rank {rank}"
            for key, grad in got["inputs"].items():
                expect = ref["inputs"][key] if key == "scale" else ref["inputs"][key][rows]
                torch.testing.assert_close(
                    grad, expect, rtol=1e-9, atol=1e-12, msg=f"{name} d/d{key} step {step} rank {rank}"
                )
            assert set(got["params"]) == set(ref["params"])
            for key, grad in got["params"].items():
                torch.testing.assert_close(
                    grad, ref["params"][key], rtol=1e-9, atol=1e-12, msg=f"{name} d/d{key}"
                )
        assert any(g.abs().sum() > 0 for g in ref["inputs"].values()), f"{name}: no input gradient at all"
