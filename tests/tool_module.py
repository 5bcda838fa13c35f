"""A script of ``tools/`` loaded as a module, for the tests that check it (tools/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as the module ``jqlora_tools_<name>``; tools/ is on sys.path while it loads (a tool may
    import another, e.g. ``import bench``)."""
    spec = importlib.util.spec_from_file_location(f"jqlora_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TOOLS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module
