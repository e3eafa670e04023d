"""What importing a clipdistill module does, checked in-process: a fresh copy of the package is imported
beside the one the suite uses (torch, open_clip and the other third-party modules stay loaded, so this
costs milliseconds where a new interpreter costs seconds), then the suite's own modules come back."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator


def _ours(name: str) -> bool:
    return name == "clipdistill" or name.startswith("clipdistill.")


@contextlib.contextmanager
def fresh_import(*modules: str) -> Iterator[set[str]]:
    """Import `modules` from scratch; yields the clipdistill modules that import loaded. Every clipdistill
    entry of `sys.modules` is restored on exit (the fresh copies are dropped)."""
    saved = {name: mod for name, mod in sys.modules.items() if _ours(name)}
    for name in saved:
        del sys.modules[name]
    try:
        for module in modules:
            importlib.import_module(module)
        yield {name for name in sys.modules if _ours(name)}
    finally:
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
