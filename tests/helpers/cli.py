"""Checking the CLI's refusals: one line on stderr, exit status 2, no hang; a CLI script for subprocesses."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

TRAIN_TESTS = Path(__file__).resolve().parent.parent / "train"

# `python cli.py ARGS` in a subprocess, with the engine tests' tiny models registered (tiny_models.py).
TINY_CLI_SCRIPT = f"""
import sys
sys.path.insert(0, {str(TRAIN_TESTS)!r})
import tiny_models
tiny_models.register()
from clipdistill.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_eval(data_root: Path | str, *args: str, model: str = "fake:x", dataset: str = "toy") -> int:
    """`clipdistill eval --model MODEL --dataset DATASET --data-root DATA_ROOT ARGS...`, in this process;
    its exit status."""
    from clipdistill.cli.main import main

    return main(["eval", "--model", model, "--dataset", dataset, "--data-root", str(data_root), *args])


def one_line_error(capsys, rc: int | None, *words: str) -> str:
    """The CLI's stderr, asserted to be one line (no traceback) holding every word in `words`, after
    exit status `rc` == 2 (None: status not checked)."""
    err = capsys.readouterr().err.strip()
    if rc is not None:
        assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


class Hang(BaseException):
    """Raised by `deadline`; a BaseException, so the shard reader's error handler cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: int, what: str = "the run"):
    """Fail (instead of hanging the suite) when the body runs longer than `seconds`."""

    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s: {what} hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
