"""Acceptance (issue 7): a run killed with SIGKILL at a random step and resumed reaches the same final
weights as an uninterrupted run, on one process (two gloo processes: test_resume_ddp.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import TINY_CLI_SCRIPT
from tiny_models import base_config

from clipdistill.train.config import config_from_dict
from clipdistill.train.engine import Run, train
from clipdistill.train.lock import LOCK


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(tmp_path: Path, cfg: dict, nproc: int, resume: bool = False) -> list[str]:
    script = tmp_path / "run_cli.py"
    script.write_text(TINY_CLI_SCRIPT)
    args = _cli_args(tmp_path, cfg, resume)
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]


def _cli_args(tmp_path: Path, cfg: dict, resume: bool = False) -> list[str]:
    cfg_file = tmp_path / f"{Path(cfg['output_dir']).name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    return ["distill", "--config", str(cfg_file)] + (["--resume"] if resume else [])


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _cli_in_child(argv: list[str]) -> None:
    from clipdistill.cli.main import main

    os._exit(main(argv))


class ForkedCli:
    """`clipdistill ARGS` in a forked copy of this process, with what `_run_and_kill` uses of a Popen: a
    process of its own that SIGKILL stops at any point, started without the seconds a new interpreter
    spends importing torch and open_clip (the suite's tiny models are registered already)."""

    def __init__(self, argv: list[str]) -> None:
        self.process = multiprocessing.get_context("fork").Process(target=_cli_in_child, args=(argv,))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> None:
        self.process.join()


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run_and_kill(proc: subprocess.Popen | ForkedCli, out: Path, after_step: int, delay: float) -> int:
    """SIGKILL the started run `proc` and all its descendants once a checkpoint at >= after_step exists
    (+ delay); returns the step the run resumes from."""
    sidecar = out / "checkpoints" / "last.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "run ended before it could be killed: " + (
                proc.stderr.read().decode()[-2000:]
                if isinstance(proc, subprocess.Popen)
                else "see its stderr"
            )
            if sidecar.exists() and json.loads(sidecar.read_text())["step"] >= after_step:
                time.sleep(delay)
                _kill_tree(proc)
                # the step resume starts from: last.pt's own (the kill may land between last.pt and its sidecar)
                return int(torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"])
            time.sleep(0.005)
        raise AssertionError("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            _kill_tree(proc)


class Crash(BaseException):
    """An in-process run dying at a step (`crash_at`): no handler of the engine catches it."""


def crash_at(monkeypatch, step: int) -> None:
    """Make the next in-process run die when it is about to take optimiser step `step` + 1."""
    original = Run.train_step

    def train_step(run, *args, **kwargs):
        if run.step == step:
            raise Crash(f"crashed before step {step + 1}")
        return original(run, *args, **kwargs)

    monkeypatch.setattr(Run, "train_step", train_step)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    diff = {k: (wa[k] - wb[k]).abs().max().item() for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, f"weights differ after resume: {diff}"


def _listing(folder: Path) -> list[str]:
    """The files under `folder`; TensorBoard's event files (one per session, named by time, host and
    pid) as one pattern."""
    names = {str(p.relative_to(folder)) for p in folder.rglob("*")}
    return sorted(
        {
            n.split("events.out.tfevents.")[0] + "events.out.tfevents.*" if "events.out.tfevents." in n else n
            for n in names
        }
    )


def _assert_clean_after_resume(run: Path, ref: Path) -> None:
    """Issue 23: no temporary file (`.NAME.tmpPID`) and no run lock survives the kill and the resume: the
    resumed run's output directory, checkpoints/ included, lists exactly the uninterrupted run's files."""
    leftovers = [str(p) for p in run.rglob("*") if ".tmp" in p.name or p.name == LOCK]
    assert not leftovers, f"left behind in {run}: {leftovers}"
    assert _listing(run) == _listing(ref), (
        f"{run} lists {_listing(run)}, the uninterrupted run {_listing(ref)}"
    )


@pytest.mark.slow  # 3 s: a training subprocess killed with SIGKILL, then resumed; CI runs it (-m slow)
def test_sigkill_resume_one_process(tiny, caption_root, tmp_path):
    rng = random.Random(11)
    changes = {"steps": 16, "checkpoint_every": 3, "data.workers": 2, "optim.accum_steps": 2}
    ref_cfg = base_config(caption_root, tmp_path / "ref", **changes)
    train(config_from_dict(ref_cfg))
    run_cfg = base_config(caption_root, tmp_path / "run", **changes)
    # the run that gets killed is a process of its own (forked: a new interpreter would add seconds of imports)
    killed_at = _run_and_kill(
        ForkedCli(_cli_args(tmp_path, run_cfg)), tmp_path / "run", rng.randint(3, 8), rng.uniform(0, 0.3)
    )
    assert killed_at < 16 and not (tmp_path / "run" / "summary.json").exists()
    summary = train(config_from_dict(run_cfg), resume=True)
    assert summary["steps"] == 16 and summary["steps_this_session"] == 16 - killed_at
    _same_weights(tmp_path / "ref" / "student.pt", tmp_path / "run" / "student.pt")
    _assert_clean_after_resume(tmp_path / "run", tmp_path / "ref")
