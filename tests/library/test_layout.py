"""The library's shape: no lab imports, short signatures, the method in one module, no global state."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pbs2p

ROOT = Path(pbs2p.__file__).parent
LAB = {"lm_eval", "matplotlib", "gguf", "mwparserfromhell", "pbs2p_lab"}


def _trees():
    for path in sorted(ROOT.rglob("*.py")):
        yield path.relative_to(ROOT), ast.parse(path.read_text())


def test_import_pbs2p_loads_nothing_of_the_lab():
    code = f"import sys, pbs2p; print(sorted({{m.split('.')[0] for m in sys.modules}} & {LAB!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_no_function_takes_more_than_eight_keyword_options():
    too_many = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                options = len(node.args.defaults) + len(node.args.kwonlyargs)
                if options > 8:
                    too_many.append(f"{path}:{node.name} ({options})")
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(d, ast.Name) and d.id == "dataclass" or getattr(d, "id", None) == "dataclass"
                    for d in node.decorator_list):
                fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and s.value is not None]
                if len(fields) > 8:
                    too_many.append(f"{path}:{node.name} ({len(fields)} fields with defaults)")
    assert not too_many


def test_the_calibrated_path_of_one_weight_is_one_short_module():
    source = (ROOT / "algorithms" / "method.py").read_text()
    assert len(source.splitlines()) <= 350
    imports = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    # nothing of the method lives elsewhere: kernels.native only runs sweep's group loop, written out here too
    assert imports <= {"__future__", "dataclasses", "kernels.packing", "kernels.native"}


def test_no_frame_inspection_and_no_global_statements():
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                found.append(f"{path}: global {', '.join(node.names)}")
            if isinstance(node, ast.Attribute) and node.attr in ("_getframe", "f_locals", "f_back"):
                found.append(f"{path}: {node.attr}")
    assert not found
