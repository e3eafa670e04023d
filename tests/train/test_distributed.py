"""DDP on two gloo processes gives the single-process gradient of the concatenated batch (spec section 0),
with and without GradCache accumulation: the engine's per-row gradient scaling and Distiller averaging."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from clipdistill.train.config import config_from_dict
from clipdistill.train.distributed import DistInfo, cleanup, init_distributed
from clipdistill.train.engine import Run

from tiny_models import base_config, register

HERE = Path(__file__).resolve().parent
CHANGES = {"optim.grad_clip": None, "losses": {"clip": 1.0, "crd": 1.0, "fd": 10.0, "icl": 1.0}}


def _slice(batch: dict, lo: int, hi: int) -> dict:
    out = dict(batch)
    out["views"] = {k: v[lo:hi] for k, v in batch["views"].items()}
    out["captions"] = batch["captions"][lo:hi]
    out["keys"] = batch["keys"][lo:hi]
    out["aug"] = batch["aug"][lo:hi]
    return out


def _grads(run: Run) -> dict[str, torch.Tensor]:
    named = {f"student.{n}": p for n, p in run.student.named_parameters()}
    named.update({f"distiller.{n}": p for n, p in run.distiller.named_parameters()})
    return {n: p.grad.clone() for n, p in named.items() if p.grad is not None}


def _worker(rank: int, world: int, port: int, root: str, out: str, accum: int) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    register()
    info = init_distributed()
    try:
        cfg = config_from_dict(base_config(root, Path(out) / f"rank{rank}", **CHANGES, **{"optim.accum_steps": accum}))
        run = Run(cfg, info)
        batch = torch.load(Path(out) / "batch.pt", weights_only=False)
        n = len(batch["keys"]) // (world * accum)
        micro = [_slice(batch, (rank * accum + i) * n, (rank * accum + i + 1) * n) for i in range(accum)]
        logs = run.train_step(micro)
        torch.save({"grads": _grads(run), "loss": logs["loss"]}, Path(out) / f"grads{rank}.pt")
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_gloo_ranks_match_single_process(tiny, caption_root, tmp_path, accum):
    cfg = config_from_dict(base_config(caption_root, tmp_path / "single", **CHANGES))
    run = Run(cfg, DistInfo())
    batch = next(iter(run.loader))
    assert len(batch["keys"]) == 8
    torch.save(batch, tmp_path / "batch.pt")
    ref_logs = run.train_step([batch])
    ref = _grads(run)
    assert any(k.startswith("distiller.") for k in ref) and "student.model.logit_scale" in ref
    mp.start_processes(_worker, args=(2, _free_port(), str(caption_root), str(tmp_path), accum), nprocs=2,
                       start_method="spawn", join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(ref_logs["loss"], rel=1e-5)
        assert got["grads"].keys() == ref.keys()
        for name, g in ref.items():
            # float32 sums in another order: compare relative to the tensor's scale
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(),
                                       msg=lambda m, name=name, rank=rank: f"{name} (rank {rank}): {m}")
