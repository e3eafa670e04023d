"""DDP (and FSDP2) on two gloo processes give the single-process gradient of the concatenated batch (spec
section 0), with and without GradCache accumulation: the engine's per-row gradient scaling and Distiller
averaging. FSDP checkpoints gather the shards and restore them."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import base_config, register

from clipdistill.train.config import config_from_dict
from clipdistill.train.distributed import DistInfo, barrier, cleanup, init_distributed
from clipdistill.train.engine import Run

HERE = Path(__file__).resolve().parent
CHANGES = {"optim.grad_clip": None, "losses": {"clip": 1.0, "crd": 1.0, "fd": 10.0, "icl": 1.0}}


def _slice(batch: dict, lo: int, hi: int) -> dict:
    out = dict(batch)
    out["views"] = {k: v[lo:hi] for k, v in batch["views"].items()}
    out["captions"] = batch["captions"][lo:hi]
    out["keys"] = batch["keys"][lo:hi]
    out["aug"] = batch["aug"][lo:hi]
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()  # FSDP shards are DTensors


def _grads(run: Run) -> dict[str, torch.Tensor]:
    named = {f"student.{n}": p for n, p in run.student.named_parameters()}
    named.update({f"distiller.{n}": p for n, p in run.distiller.named_parameters()})
    return {n: _full(p.grad) for n, p in named.items() if p.grad is not None}


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    register()
    info = init_distributed()
    try:
        batch = torch.load(Path(out) / "batch.pt", weights_only=False)
        # plain DDP step; GradCache micro-batches under no_sync; FSDP2 with micro-batches
        for name, accum, fsdp in (("ddp1", 1, False), ("ddp2", 2, False), ("fsdp2", 2, True)):
            cfg = config_from_dict(
                base_config(
                    root,
                    Path(out) / f"{name}-{rank}",
                    **CHANGES,
                    **{
                        "optim.accum_steps": accum,
                        "distributed.fsdp": fsdp,
                        "output_dir": str(Path(out) / name),
                    },
                )
            )
            run = Run(cfg, info)
            n = len(batch["keys"]) // (world * accum)
            micro = [_slice(batch, (rank * accum + i) * n, (rank * accum + i + 1) * n) for i in range(accum)]
            logs = run.train_step(micro)
            grads = _grads(run)
            if fsdp:  # checkpoint round trip of a sharded student and optimiser
                run.step = 1
                run._checkpoint()
                barrier()  # rank 0 writes the file the others read next
                weights = {n: _full(p.detach()) for n, p in run.student.named_parameters()}
                again = Run(cfg, info, resume=True)
                assert again.step == 1
                for n, p in again.student.named_parameters():
                    assert torch.equal(_full(p.detach()), weights[n]), n
                assert (
                    again.optimizer.state_dict()["state"].keys() == run.optimizer.state_dict()["state"].keys()
                )
            torch.save({"grads": grads, "loss": logs["loss"]}, Path(out) / f"grads{rank}-{name}.pt")
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_single_process(tiny, caption_root, tmp_path):
    cfg = config_from_dict(base_config(caption_root, tmp_path / "single", **CHANGES))
    run = Run(cfg, DistInfo())
    batch = next(iter(run.loader))
    assert len(batch["keys"]) == 8
    torch.save(batch, tmp_path / "batch.pt")
    ref_logs = run.train_step([batch])
    ref = _grads(run)
    assert any(k.startswith("distiller.") for k in ref) and "student.model.logit_scale" in ref
    # fork: the children inherit the imported modules and registrations (spawn re-imports for ~15 s)
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(caption_root), str(tmp_path)),
        nprocs=2,
        start_method="fork",
        join=True,
    )
    for rank, mode in [(r, m) for m in ("ddp1", "ddp2", "fsdp2") for r in range(2)]:
        got = torch.load(tmp_path / f"grads{rank}-{mode}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(ref_logs["loss"], rel=1e-5)
        assert got["grads"].keys() == ref.keys()
        for name, g in ref.items():
            # float32 sums in another order: compare relative to the tensor's scale
            torch.testing.assert_close(
                got["grads"][name],
                g,
                rtol=1e-4,
                atol=1e-5 * g.abs().max().item(),
                msg=lambda m, p=name, rank=rank, mode=mode: f"{p} (rank {rank}, {mode}): {m}",
            )
