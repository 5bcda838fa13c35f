"""Lazy re-exports for the CLI modules: `python -m jqlora.X` must parse its arguments before importing JAX, yet
`jqlora.X.some_function` should keep working for code that imports the library through the CLI's name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def forward_to(module: str, *targets: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) for ``module`` that looks names up in ``targets`` (module paths, in
    order), importing them only when a name is first asked for."""
    def __getattr__(name: str) -> Any:
        for target in targets:
            mod = importlib.import_module(target)
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
