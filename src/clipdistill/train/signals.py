"""SIGTERM during training (a scheduler's preemption, `kill`): it raises `Terminated` in the training
process, so the run stops between two statements, closes its logs and exits with 128 + SIGTERM, its last
checkpoint intact; forked DataLoader workers die as SIGTERM would."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so no `except Exception` swallows it)."""


_SIGTERM_OWNER: list[int] = []  # the pid that installed `_on_sigterm` (forked DataLoader workers inherit it)


def _on_sigterm(signum, frame) -> None:
    if _SIGTERM_OWNER and os.getpid() != _SIGTERM_OWNER[-1]:  # a worker: die as SIGTERM would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside: SIGTERM raises `Terminated` (installed from the main thread only; the previous handler
    comes back on exit)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        _SIGTERM_OWNER.append(os.getpid())
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            _SIGTERM_OWNER.pop()
