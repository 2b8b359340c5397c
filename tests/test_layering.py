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


# ------------------------------------------------------------------------------------------- the layers
# Each top-level module or package of finetune, by layer; a module imports from its own layer and those below.
LAYERS = {
    "foundation": {"errors", "atomic", "names", "processes", "supervisor", "config", "config_check", "config_file",
                   "choices", "generation"},
    "storage": {"registry"},
    "engine": {"data", "modeling", "training", "decoding", "loading", "inference", "compare", "export", "export_gguf",
               "gguf_files", "gguf_template", "gguf_vocab", "tiny", "tiny_families", "launch"},
    "service": {"serving", "server", "web", "queue", "cluster", "cli", "app", "__main__"},
}
ORDER = ["foundation", "storage", "engine", "service"]
# Within the service layer: the API knows nothing of the adapters beside and above it.
FORBIDDEN = {"server": {"web", "cli", "app"}, "serving": {"server", "web", "cli", "app"}, "web": {"cli"}}


def _unit(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imported(path, module: str) -> set[str]:
    """Every finetune module ``module`` imports, at its top or inside functions."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("finetune."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("finetune."):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
    return out


def test_imports_flow_one_way_between_layers():
    from pathlib import Path

    import finetune

    root = Path(finetune.__file__).parent
    layer_of = {unit: layer for layer, units in LAYERS.items() for unit in units}
    problems, unplaced = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if path.name == "__init__.py" else rel.parts)
        unit = _unit(module)
        if not unit:
            continue  # the package's own __init__ (its lazy `load`)
        if unit not in layer_of:
            unplaced.append(module)
            continue
        for target in _imported(path, module):
            other = _unit(target)
            if other not in layer_of or other == unit:
                continue
            if ORDER.index(layer_of[other]) > ORDER.index(layer_of[unit]) or other in FORBIDDEN.get(unit, ()):
                problems.append(f"{module} imports {target} ({layer_of[unit]} -> {layer_of[other]})")
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    assert not problems, "\n".join(sorted(set(problems)))


def test_no_import_cycle_between_modules():
    """Module-level imports (what runs at import time) form no cycle; imports inside functions are left out."""
    import ast
    from pathlib import Path

    import finetune

    root = Path(finetune.__file__).parent
    paths = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        paths[".".join(rel.parts[:-1] if path.name == "__init__.py" else rel.parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{name}.{a.name}" for a in node.names]
                graph[module].update(c for c in (subs if all(c in paths for c in subs) else [*subs, name])
                                     if c in paths and c != module)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name in paths)
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
