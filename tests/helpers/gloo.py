"""Start `nprocs` forked processes of a gloo worker and wait for them, failing the test on a hang."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp


def run_processes(worker, args: tuple, nprocs: int, timeout: float = 120, poll: float = 2) -> None:
    """`worker(rank, *args)` in `nprocs` processes (fork: the children inherit the imported modules;
    spawn re-imports torch and the terms for seconds); pytest.fail after `timeout` seconds."""
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=poll):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"the {nprocs}-process gloo run did not finish in {timeout:g} s")
