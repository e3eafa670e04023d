"""One live run per output folder (issue 23): an exclusive `flock` on `<output_dir>/.lock`, held for the
run's lifetime, and the cleanup of what killed runs leave behind.

The kernel drops a flock when its holders die, however they die, so a lock left by a killed run is
never mistaken for a live one; the file keeps the holder's pid for the message. A finished run
removes the file; a second run that opened it just before that re-checks that its locked file is
still the one at the path.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import time
from pathlib import Path

from clipdistill.checks import check_output_dir
from clipdistill.errors import UserError

log = logging.getLogger(__name__)

LOCK = ".lock"
# A run killed by SIGKILL dies at once, but the processes it forked (DataLoader workers) share its lock
# until they notice (torch's workers check their parent every 5 s): wait that long when the pid in the
# lock file is gone.
ORPHAN_WAIT_S = 15.0
_TEMP = re.compile(r"^\..+\.tmp\d+$")  # paths.atomic_path: `.<name>.tmp<pid>`


class RunLock:
    """`with RunLock(output_dir):` holds the folder for one run; a second run is refused with one line.

    A folder this lock created is removed again when the run leaves nothing in it (a run refused
    before its first step writes nothing under output_dir).
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.dir = Path(output_dir).expanduser()
        self.path = self.dir / LOCK
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        check_output_dir(self.dir)
        self.created = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create output_dir '{self.dir}' ({err.strerror}); pass another folder"
            ) from None
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                if not _holder_alive(self.path) and time.monotonic() < deadline:
                    time.sleep(0.2)  # a killed run's forked workers still hold it; they exit on their own
                    continue
                self._cleanup_dir()
                raise UserError(
                    f"output_dir '{self.dir}' is in use by another run ({_holder(self.path)}); wait for it to end, "
                    "or choose another output_dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder finished and removed the file between our open and flock
        stale = os.read(fd, 64).decode(errors="replace").strip()
        if stale and stale != str(os.getpid()):
            log.info(
                "output_dir %s: taking over the lock of pid %s, which ended without releasing it",
                self.dir,
                stale,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: see the module docstring
        os.close(self.fd)
        self.fd = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.created:
            try:
                self.dir.rmdir()  # only when empty
            except OSError:
                pass


def _holder_alive(path: Path) -> bool:
    """Whether the pid recorded in the lock file is a live process (True when unknown)."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "pid unknown"


def remove_stale_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete the half-written temporary files (`.<name>.tmp<pid>`) of killed runs in `output_dir` and
    its checkpoints folder; only safe while holding the folder's `RunLock`. Returns what was removed."""
    removed = []
    for folder in (Path(output_dir), Path(output_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _TEMP.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info(
            "removed %d half-written file(s) of an interrupted run: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed
