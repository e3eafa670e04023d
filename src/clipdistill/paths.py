"""Where data and caches live. Resolved from arguments and the environment, never at import."""

from __future__ import annotations

import os
from pathlib import Path

from clipdistill.errors import UserError


def cache_dir() -> Path:
    """Root of clipdistill's caches (feature caches, built teachers): $CLIPDISTILL_CACHE or ~/.cache/clipdistill."""
    return Path(os.environ.get("CLIPDISTILL_CACHE", Path.home() / ".cache" / "clipdistill"))


def fetch_root(explicit: str | Path | None = None) -> Path:
    """Where `clipdistill data get` writes: `explicit`, else $CLIPDISTILL_DATA, else cache_dir()/data."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("CLIPDISTILL_DATA"):
        return Path(os.environ["CLIPDISTILL_DATA"]).expanduser()
    return cache_dir() / "data"


def find_data_root(explicit: str | Path | None = None) -> Path:
    """The datasets folder, first match of: `explicit` (--data-root), $CLIPDISTILL_DATA, ../shared/data
    found upward from the working directory, cache_dir()/data (where `clipdistill data get` writes).
    The result may not exist; `data_root` checks."""
    if explicit is not None or os.environ.get("CLIPDISTILL_DATA"):
        return fetch_root(explicit)
    for base in (Path.cwd(), *Path.cwd().parents):
        candidate = base / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return cache_dir() / "data"


def data_root(explicit: str | Path | None = None) -> Path:
    """The existing datasets folder (`find_data_root`); a one-line UserError naming the fix otherwise."""
    root = find_data_root(explicit)
    if root.is_dir():
        return root
    if explicit is None and not os.environ.get("CLIPDISTILL_DATA"):
        raise UserError(
            f"no datasets found (looked for ../shared/data and {root}); fetch them with "
            "`clipdistill data get NAME ...`, or pass --data-root DIR / set CLIPDISTILL_DATA to a local copy"
        )
    raise UserError(f"data root '{root}' is not a directory; pass --data-root DIR or set CLIPDISTILL_DATA")


def atomic_path(path: Path) -> Path:
    """A temporary sibling of `path` to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")
