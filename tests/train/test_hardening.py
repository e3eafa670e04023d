"""Issue 23 (hardening) in `clipdistill distill`: no hang on an empty stream, one live run per output_dir,
finished runs left alone on --resume, no half-written files left behind, changed optimiser settings
applied on resume, late checks moved before step 0, honest skip counts and NaN messages."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import TINY_CLI_SCRIPT, deadline, one_line_error
from tiny_models import base_config

from clipdistill.cli.main import main
from clipdistill.data.loader import EmptyStream, StreamConfig, TrainStream, make_loader
from clipdistill.errors import UserError
from clipdistill.train.checkpoint import save_checkpoint
from clipdistill.train.config import config_from_dict
from clipdistill.train.distributed import init_distributed
from clipdistill.train.engine import NonFiniteLoss, Run, _next_batch, train
from clipdistill.train.lock import LOCK, RunLock


def _cli(tmp_path: Path, cfg: dict, *extra: str) -> int:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    return main(["distill", "--config", str(cfg_file), *extra])


def _empty_split(root: Path, name: str, content: bytes | None) -> None:
    """A retrieval dataset `name` whose only train shard is an empty tar (content None) or `content`."""
    import tarfile

    split = root / name / "train"
    split.mkdir(parents=True)
    (root / name / "dataset_type.txt").write_text("retrieval")
    (split / "nshards.txt").write_text("1")
    if content is None:
        with tarfile.open(split / "0.tar", "w"):
            pass
    else:
        (split / "0.tar").write_bytes(content)


# --- 1. no hang when the stream yields nothing --------------------------------------------------------


@pytest.mark.parametrize("trigger", ["keep-list", "empty tar", "0-byte shard"])
def test_empty_stream_is_refused_before_step_0(tiny, caption_root, tmp_path, capsys, trigger):
    cfg = base_config(caption_root, tmp_path / "run")
    extra: list[str] = []
    if trigger == "keep-list":
        (tmp_path / "keep.txt").write_text("no-such-key\n")
        extra = ["--keep", str(tmp_path / "keep.txt")]
    else:
        _empty_split(caption_root, "nothing", None if trigger == "empty tar" else b"")
        cfg["data"]["train"] = ["nothing:train"]
    with deadline(60):
        rc = _cli(tmp_path, cfg, *extra)
    assert rc == 2
    one_line_error(capsys, None, "no sample" if trigger == "keep-list" else "no readable sample")
    assert not (tmp_path / "run").exists()


def test_empty_stream_stops_after_one_epoch(tmp_path, make_dataset):
    """The stream's own guard (the engine's check is bypassed here): no endless epochs, and with a
    DataLoader worker the error still comes back as one line."""
    root = make_dataset("caps", kind="retrieval", n=0, split="train")
    shard = root / "caps" / "train" / "0.tar"
    shard.write_bytes(b"")
    cfg = StreamConfig(shards=[shard], batch_size=2, views={})
    with deadline(30), pytest.raises(EmptyStream, match="no usable sample in a whole epoch"):
        next(iter(TrainStream(cfg)))
    cfg.workers = 1
    loader = iter(make_loader(cfg))
    try:
        with deadline(60), pytest.raises(UserError) as err:
            _next_batch(loader)
    finally:
        # now, not at garbage collection: the error's traceback keeps the loader in a reference cycle, and
        # collected with it its queues close first, so its worker never hears the stop (a 5 s join timeout)
        loader._shutdown_workers()
    assert len(str(err.value).splitlines()) == 1 and "no usable sample" in str(err.value)


def test_zero_byte_shard_no_stderr_flood(tiny, caption_root, tmp_path, capfd, monkeypatch):
    """All `clipdistill distill` writes to stderr on a 0-byte shard is its one-line error: run in-process as a
    fresh process would, with no log handler (the CLI's own logging set-up then prints to stderr) and Python
    warnings printed; capfd also sees what C code writes to fd 2. The same in a new interpreter: below (slow)."""
    _empty_split(caption_root, "nothing", b"")
    cfg = base_config(caption_root, tmp_path / "run", **{"data.train": ["nothing:train"]})
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # Python's filters without -W: the rest shown once per place
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        )
        rc = _cli(tmp_path, cfg)
    err = capfd.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no readable sample" in lines[0], err[-2000:]


@pytest.mark.slow  # 5 s: a new interpreter importing torch and open_clip
def test_zero_byte_shard_no_stderr_flood_in_a_new_process(tiny, caption_root, tmp_path):
    _empty_split(caption_root, "nothing", b"")
    cfg = base_config(caption_root, tmp_path / "run", **{"data.train": ["nothing:train"]})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "cli.py").write_text(TINY_CLI_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "cli.py"), "distill", "--config", str(tmp_path / "run.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no readable sample" in lines[0], proc.stderr[-2000:]


def test_fewer_samples_than_streams_is_refused(tiny, make_dataset, tmp_path):
    root = make_dataset("caps", kind="retrieval", n=1, split="train")
    cfg = config_from_dict(base_config(root, tmp_path / "run", **{"data.workers": 2}))
    with deadline(60), pytest.raises(UserError, match="fewer than its 2 data streams"):
        train(cfg)


# --- 2. one live run per output_dir -------------------------------------------------------------------


def test_second_live_run_is_refused(tiny, caption_root, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):  # another run holds the folder
        with pytest.raises(UserError, match="in use by another run"):
            train(config_from_dict(base_config(caption_root, out, steps=2)))
        assert sorted(p.name for p in out.iterdir()) == [LOCK]


def test_stale_lock_of_a_killed_run_is_taken_over(tiny, caption_root, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
from clipdistill.train.lock import RunLock
lock = RunLock({str(out)!r}).__enter__()
print("locked", flush=True)
time.sleep(120)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            train(config_from_dict(base_config(caption_root, out, steps=2)))
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).exists()  # SIGKILL left the file, but the kernel dropped its lock
    summary = train(config_from_dict(base_config(caption_root, out, steps=2)))
    assert summary["steps"] == 2 and not (out / LOCK).exists()


def test_output_dir_that_is_a_file_is_refused(tiny, caption_root, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train(config_from_dict(base_config(caption_root, tmp_path / "run", steps=2)))


# --- 7, 8. temporary files; --resume on a finished run ------------------------------------------------


def test_resume_on_finished_run_changes_nothing(tiny, caption_root, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = base_config(caption_root, out, steps=2)
    assert _cli(tmp_path, cfg) == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _cli(tmp_path, cfg, "--resume") == 0
    assert "already finished" in capsys.readouterr().out
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert json.loads((out / "summary.json").read_text())["final"]


def test_half_written_files_of_a_killed_run_are_removed(tiny, caption_root, tmp_path):
    out = tmp_path / "run"
    train(config_from_dict(base_config(caption_root, out, steps=2)))
    planted = [
        out / "checkpoints" / ".last.pt.tmp4242",
        out / "checkpoints" / ".last.json.tmp4242",
        out / ".student.pt.tmp7",
    ]
    for p in planted:
        p.write_bytes(b"half a checkpoint")
    summary = train(config_from_dict(base_config(caption_root, out, steps=4)), resume=True)
    assert summary["steps"] == 4 and summary["final"]
    assert not any(p.exists() for p in planted)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.json", "last.pt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def torn(obj, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"step": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_sigterm_says_how_to_resume(tiny, caption_root, tmp_path, monkeypatch, caplog, capsys):
    """SIGTERM (a scheduler's preemption) during training, sent here by the run's own process once it has
    a checkpoint: the same handler and exit path as `kill` from outside (test_resume.py kills a real one)."""
    from clipdistill.train import signals

    out = tmp_path / "run"
    step = Run.train_step

    def train_step(run, *args, **kwargs):
        if (
            getattr(run, "last_checkpoint_step", None)
            and signal.getsignal(signal.SIGTERM) is signals._on_sigterm
        ):
            os.kill(os.getpid(), signal.SIGTERM)
        return step(run, *args, **kwargs)

    monkeypatch.setattr(Run, "train_step", train_step)
    with pytest.raises(SystemExit) as done:
        _cli(tmp_path, base_config(caption_root, out, steps=400, checkpoint_every=1))
    assert done.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 1 of 400" in caplog.text and "--resume" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    assert not [p for p in out.rglob(".*") if p.is_file()]  # neither the lock nor a temporary file is left


# --- 5. changed optimiser settings on --resume --------------------------------------------------------


def test_resume_applies_a_changed_learning_rate(tiny, caption_root, tmp_path, caplog):
    out = tmp_path / "run"
    train(config_from_dict(base_config(caption_root, out, steps=2)))
    cfg = config_from_dict(base_config(caption_root, out, steps=6, **{"optim.lr": 1e-4}))
    with caplog.at_level("WARNING"):
        run = Run(cfg, init_distributed(None, "cpu"), resume=True)
    assert run.step == 2
    assert [g["initial_lr"] for g in run.optimizer.param_groups] == run.scheduler.base_lrs
    assert all(
        g["initial_lr"] == pytest.approx(1e-4)
        for g in run.optimizer.param_groups
        if g.get("name") == "student"
    )
    factor = run.scheduler.lr_lambdas[0](2)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(run.scheduler.base_lrs[0] * factor)
    assert "optim.lr 0.001 -> 0.0001" in caplog.text


# --- 4, 10. checks before step 0 ----------------------------------------------------------------------


def test_eval_dataset_typo_is_found_before_training(tiny, caption_root, tmp_path):
    cfg = config_from_dict(base_config(caption_root, tmp_path / "run", **{"eval.datasets": ["cpas:test"]}))
    with pytest.raises(UserError, match="eval.datasets entry 'cpas:test'.*did you mean 'caps'"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    cfg = config_from_dict(base_config(caption_root, tmp_path / "run", **{"eval.datasets": ["caps:val"]}))
    with pytest.raises(UserError, match="no split 'val'"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"losses": {"clip": 0.0}}, "every loss weight is 0"),
        ({"losses": {"clip": 0.0, "fd": 0}}, "every loss weight is 0"),
        ({"threads": 0}, "threads = 0 must be >= 1"),
    ],
)
def test_silent_accepts_are_refused(caption_root, tmp_path, change, words):
    with pytest.raises(UserError, match=words):
        config_from_dict(base_config(caption_root, tmp_path / "run", **change))


# --- 6. skip counts -----------------------------------------------------------------------------------


def test_shard_read_errors_reach_the_summary(tiny, make_dataset, tmp_path):
    root = make_dataset("caps", kind="retrieval", n=24, shards=2, split="train")
    (root / "caps" / "train" / "1.tar").write_bytes(b"")  # unreadable: a read error, once per epoch
    summary = train(config_from_dict(base_config(root, tmp_path / "run", steps=4)))
    assert summary["skipped"].get("unreadable shard data", 0) >= 1, summary["skipped"]


# --- 9. NaN messages ----------------------------------------------------------------------------------


def test_nan_before_the_first_checkpoint_claims_no_checkpoint(tiny, caption_root, tmp_path, monkeypatch):
    from clipdistill.losses.clip_kd import FeatureDistill

    original = FeatureDistill.forward
    monkeypatch.setattr(
        FeatureDistill,
        "forward",
        lambda self, s, t: {k: v * float("nan") for k, v in original(self, s, t).items()},
    )
    with pytest.raises(NonFiniteLoss) as err:
        train(config_from_dict(base_config(caption_root, tmp_path / "run")))
    assert "no checkpoint was written yet" in str(err.value) and "step 0" not in str(err.value)


def test_nan_gradient_names_the_term(tiny, caption_root, tmp_path, monkeypatch):
    from clipdistill.train import engine

    original = engine.clip_grad_norm

    def poisoned(params, max_norm):
        for p in params:
            if p.shape == ():  # ICL's learnable temperature: a parameter of term 'icl'
                p.grad.fill_(float("nan"))
        return original(params, max_norm)

    monkeypatch.setattr(engine, "clip_grad_norm", poisoned)
    cfg = config_from_dict(base_config(caption_root, tmp_path / "run", losses={"clip": 1.0, "icl": 1.0}))
    with pytest.raises(
        NonFiniteLoss,
        match=r"gradient norm is nan at step 1, non-finite in the parameters of term 'icl' "
        r"\(loss terms: clip=.*icl=.*\); no checkpoint was written yet",
    ):
        train(cfg)
