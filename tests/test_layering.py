"""Import boundaries: storage never pulls in torch; prompt formats never pull in `datasets`; the API never pulls
in the web app.

Each check runs in a fresh interpreter, since this test process has long imported both.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
names = [package.__name__]
if hasattr(package, "__path__"):
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({{"modules": names, "loaded": sorted(m for m in {banned!r} if m in sys.modules)}}))
"""


def _imports(package: str, banned: tuple[str, ...]) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(package=package, banned=banned)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package, banned", [
    ("finetune.registry", ("torch", "transformers", "peft", "accelerate", "datasets")),
    ("finetune.data.formats", ("datasets", "torch")),
    ("finetune.config", ("finetune.data", "torch")),  # foundation: reading a config imports no engine
    # serve starts in < 2 s; the web app is an adapter beside the API (finetune.app assembles both)
    ("finetune.server", ("torch", "transformers", "peft", "accelerate", "datasets", "finetune.web")),
])
def test_package_does_not_import(package: str, banned: tuple[str, ...]):
    result = _imports(package, banned)
    assert result["loaded"] == [], f"importing {result['modules']} loaded {result['loaded']}"
    if package == "finetune.registry":
        assert {"finetune.registry.store", "finetune.registry.jobs", "finetune.registry.publish",
                "finetune.registry.gc"} <= set(result["modules"])
