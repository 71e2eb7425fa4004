"""The package stands alone: it imports as the wheel ships it, without the research code in bench/
(scipy, ../shared), and documents written before a field was retired still load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from alloy.devices import Inventory
from alloy.plan import Plan, Workload, make_plan
from alloy.checkpoint import resolve_spec

PACKAGE = Path(__file__).resolve().parents[1] / "alloy"
WORKSTATION = PACKAGE.parent / "examples/clusters/workstation.json"

# Imports every alloy module with scipy blocked and only the copied package on the path: no bench/,
# no ../shared beside it. walk_packages swallows a package's ImportError unless onerror raises it.
IMPORT_ALL = """
import importlib, pkgutil, sys
sys.modules["scipy"] = None
import alloy
assert alloy.__file__.startswith(sys.argv[1]), alloy.__file__
def reraise(name):
    raise  # called inside walk_packages' `except ImportError`: the original error, traceback and all
names = [m.name for m in pkgutil.walk_packages(alloy.__path__, "alloy.", onerror=reraise)
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "bench" or m.startswith(("bench.", "scipy.")))
assert not leaked, leaked
print(len(names))
"""


def test_every_alloy_module_imports_without_scipy_bench_or_shared(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "alloy", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ALLOY_PUBLISHED_DATA")}
    run = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) > 50  # the walk found the package's modules, not an empty tree


def test_documents_with_the_retired_tensor_parallel_field_still_load(tmp_path):
    """Every plan and saved inventory written while DeviceProfile had `tensor_parallel` carries it
    (1 by default, more from a declared TP group); it is ignored on load, in both input paths."""
    inventory = Inventory.load(WORKSTATION)
    plan = make_plan(resolve_spec("tiny-llama"), inventory, Workload(task="train", batch_size=8, seq_len=64))
    old = json.loads(plan.to_json())
    assert "tensor_parallel" not in old["devices"][0]
    for i, device in enumerate(old["devices"]):
        device["tensor_parallel"] = 1 if i else 4
    (tmp_path / "plan.json").write_text(json.dumps(old))
    assert Plan.load(tmp_path / "plan.json") == plan

    doc = json.loads(WORKSTATION.read_text())
    for device in doc["devices"]:
        device["tensor_parallel"] = 1
    assert Inventory.parse(doc) == inventory
    assert Inventory.parse(json.dumps(doc)) == inventory


# ---- the README's "Where things live" table is the import rule ----------------------------------

README = PACKAGE.parent / "README.md"
SHARED = {"errors", "jsonio"}  # every package may use these


def _rule() -> dict[str, set[str] | None]:
    """package -> the alloy packages it may import (None: anything), from the README's table."""
    text = README.read_text()
    table = text[text.index("## Where things live"):].split("\n\n")[1]
    rule = {}
    for row in table.splitlines()[2:]:
        folder, *_, imports = [cell.strip() for cell in row.strip("|").split("|")]
        folder = folder.strip("`")
        if not folder.startswith("alloy/"):
            continue
        allowed = None if imports == "anything" else {
            word.split("(")[0].strip() for word in imports.split(",") if word.strip() not in ("—", "")}
        if folder == "alloy/*.py":
            for module in PACKAGE.glob("*.py"):
                if module.stem not in {"__init__", "__main__"} | SHARED:
                    rule[module.stem] = allowed
        else:
            rule[folder.removeprefix("alloy/").strip("/")] = allowed
    return rule


def _imports_of(piece: str) -> set[str]:
    """The alloy packages a package (or top-level module) imports anywhere in its code, lazy
    imports inside functions included."""
    import ast

    files = [PACKAGE / f"{piece}.py"] if (PACKAGE / f"{piece}.py").is_file() else (PACKAGE / piece).rglob("*.py")
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "alloy":
                    found |= {alias.name for alias in node.names}
                elif node.module.startswith("alloy."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("alloy.")}
    return found - {piece}


def test_every_package_imports_only_what_the_readme_table_allows():
    rule = _rule()
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"} - SHARED
    assert packages | modules == set(rule), "every package has a row in the README's table, and only those"
    broken = {}
    for piece, allowed in rule.items():
        if allowed is None:
            continue
        extra = _imports_of(piece) - allowed - SHARED
        if extra:
            broken[piece] = sorted(extra)
    assert not broken, f"imports against the README's table (alloy/<package> -> packages): {broken}"
    assert _imports_of("errors") == set() and _imports_of("jsonio") <= {"errors"}


def test_the_import_check_sees_lazy_imports_and_the_rule_forbids_upward_ones():
    # infer imports the runtime's launcher only inside functions: the scan must still see it
    assert "runtime" in _imports_of("infer")
    rule = _rule()
    assert "plan" not in rule["model"] and "model" not in rule["devices"] and rule["spec"] == set()
