"""The project's scripts/ as modules for tests: ``load_script("bench_data")`` imports scripts/bench_data.py.

Scripts import each other by bare name (bench_dpo imports bench_train), as they do when run from scripts/, so
the folder is put on ``sys.path`` first."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """A fresh module of ``scripts/NAME.py``."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
