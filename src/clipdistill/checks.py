"""Checks of user-given output paths, made before any work starts (issue 23): a path that cannot be
written is refused with one line, not found after an hour of training or evaluation."""

from __future__ import annotations

import os
from pathlib import Path

from clipdistill.errors import UserError


def _existing_ancestor(path: Path) -> Path:
    parent = path
    while not parent.exists():
        parent = parent.parent
    return parent


def check_output_dir(path: str | Path, what: str = "output_dir") -> Path:
    """`path` as an output folder: refused when it is a file or cannot be created or written there."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a folder; pass a folder path (new or existing)")
    parent = _existing_ancestor(path)
    if not parent.is_dir():
        raise UserError(
            f"{what} '{path}' cannot be created: '{parent}' is a file, not a folder; pass another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"{what} '{path}' cannot be written: no write permission in '{parent}'; pass another folder"
        )
    return path


def check_output_file(path: str | Path, what: str = "--output") -> Path:
    """`path` as an output file: refused when it is a folder or cannot be created or written there."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; pass a file path such as {path / 'record.json'}")
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise UserError(
            f"{what} '{path}' cannot be created: '{parent}' is a file, not a folder; pass another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{what} '{path}' is not writable (permissions of '{parent}'); pass another path")
    return path
