"""Where data and caches live. Resolved from arguments and the environment, never at import."""

from __future__ import annotations

import os
from pathlib import Path

from clipdistill.errors import UserError


def cache_dir() -> Path:
    """Root of clipdistill's caches (feature caches, built teachers): $CLIPDISTILL_CACHE or ~/.cache/clipdistill."""
    return Path(os.environ.get("CLIPDISTILL_CACHE", Path.home() / ".cache" / "clipdistill"))


def data_root(explicit: str | Path | None = None) -> Path:
    """The datasets folder: `explicit`, else $CLIPDISTILL_DATA, else ../shared/data when it exists."""
    if explicit is not None:
        root = Path(explicit)
    elif os.environ.get("CLIPDISTILL_DATA"):
        root = Path(os.environ["CLIPDISTILL_DATA"])
    else:
        root = None
        for base in (Path.cwd(), *Path.cwd().parents):
            candidate = base / "shared" / "data"
            if candidate.is_dir():
                root = candidate
                break
        if root is None:
            raise UserError("no data root: pass --data-root DIR or set CLIPDISTILL_DATA to the datasets folder")
    if not root.is_dir():
        raise UserError(f"data root '{root}' is not a directory; pass --data-root DIR or set CLIPDISTILL_DATA")
    return root


def atomic_path(path: Path) -> Path:
    """A temporary sibling of `path` to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")
