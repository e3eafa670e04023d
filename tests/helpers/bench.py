"""The side-by-side benchmark's package (benchmarks/methods/, not installed) loaded under an alias."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parents[2] / "benchmarks" / "methods"


@contextlib.contextmanager
def methods_package(alias: str) -> Iterator[ModuleType]:
    """benchmarks/methods imported as `alias` (its submodules as `alias.<name>`), dropped again on exit."""
    spec = importlib.util.spec_from_file_location(
        alias, PACKAGE / "__init__.py", submodule_search_locations=[str(PACKAGE)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        for name in [n for n in sys.modules if n == alias or n.startswith(f"{alias}.")]:
            sys.modules.pop(name)
