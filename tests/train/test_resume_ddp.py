"""Acceptance (issue 7): a two-process gloo run killed with SIGKILL at a random step and resumed reaches
the same final weights as an uninterrupted two-process run."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from test_resume import _assert_clean_after_resume, _command, _popen, _run_and_kill, _same_weights
from tiny_models import base_config

from clipdistill.train.config import config_from_dict
from clipdistill.train.engine import train


def _train_worker(rank: int, world: int, port: int, cfg: dict, resume: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    train(config_from_dict(cfg), resume=resume)


def _fork_run(cfg: dict, resume: bool = False) -> None:
    """A 2-process gloo run in forked children (no re-import: seconds instead of a torchrun launch)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_train_worker, args=(2, port, cfg, resume), nprocs=2, start_method="fork", join=True)


@pytest.mark.slow  # 12 s on 2 shared cores: a torchrun launch plus two forked 2-rank runs
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sigkill_resume_two_gloo_processes(tiny, caption_root, tmp_path):
    rng = random.Random(5)
    # evaluation at the end runs on rank 0 alone inside the process group (train/evaluate.py)
    changes = {"steps": 12, "checkpoint_every": 2, "eval.datasets": ["caps:train"]}
    ref_cfg = base_config(caption_root, tmp_path / "ref", **changes)
    _fork_run(ref_cfg)
    run_cfg = base_config(caption_root, tmp_path / "run", **changes)
    # The run that gets killed is a real torchrun launch: SIGKILL hits the agent and both workers.
    killed_at = _run_and_kill(
        _popen(_command(tmp_path, run_cfg, 2)), tmp_path / "run", rng.randint(2, 6), rng.uniform(0, 0.3)
    )
    assert killed_at < 12 and not (tmp_path / "run" / "summary.json").exists()
    _fork_run(run_cfg, resume=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world"] == 2 and summary["steps_this_session"] == 12 - killed_at
    assert "text_retrieval_recall@1" in summary["eval"]["caps:train"]
    _same_weights(tmp_path / "ref" / "student.pt", tmp_path / "run" / "student.pt")
    _assert_clean_after_resume(tmp_path / "run", tmp_path / "ref")
