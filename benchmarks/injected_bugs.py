"""Real bugs injected into the method core, one at a time: which test catches each.

    python benchmarks/injected_bugs.py

Each bug is a one-line edit of ``pbs2p/algorithms/method.py`` (seven bug classes that once survived the
whole algorithm test suite), or of the native group loop ``pbs2p/kernels/csrc/sweep.cpp`` (two of them
again, in the native copy of that arithmetic, rebuilt in the copy). For each, the repository's ``pbs2p``,
``pbs2p_lab``, ``tests`` and ``pyproject.toml`` are copied to a temporary folder, the edit is applied there
(never to this tree), and the method-core tests (``tests/library/algorithms`` without the subprocess pins;
its ``test_native_sweep.py`` holds the native loop to the torch loop) run against the copy with
``pytest -x``; the first failing test is recorded. A control run without an edit must pass. Writes
``benchmarks/results/mutation/injected_bugs.{json,md}`` and exits 1 if a bug survives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
METHOD = "pbs2p/algorithms/method.py"
SWEEP = "pbs2p/kernels/csrc/sweep.cpp"
TESTS = ["tests/library/algorithms",
         "--deselect", "tests/library/algorithms/test_pins.py"]

#: name -> (file, the exact text, its buggy replacement; every occurrence is replaced)
BUGS: dict[str, tuple[str, str, str]] = {
    "block-to-block update sign flipped": (METHOD, "W[:, e:] -= E @ U[s:e, e:]", "W[:, e:] += E @ U[s:e, e:]"),
    "within-group update sign flipped": (METHOD, "Wt[g0 + j + 1:g1].sub_(", "Wt[g0 + j + 1:g1].add_("),
    "1/U_jj factor dropped": (METHOD, ".div_(dl[s + g0 + j])", ".div_(1.0)"),
    "exact block update replaced by its diagonal": (METHOD, 'exact = compensation == "block"', "exact = False"),
    "SPBO's refit between steps removed": (METHOD, "if i + 1 < len(steps):", "if False:"),
    "act-order reversed": (METHOD, "argsort(g[idx], descending=True", "argsort(g[idx], descending=False"),
    "dead input columns not zeroed": (METHOD, "W[:, prep.dead] = 0.0", "pass"),
    # the same arithmetic in the native group loop (caught by its bit-for-bit test against the torch loop)
    "native loop: within-group update sign flipped": (SWEEP, "target[r] = target[r] - product;",
                                                      "target[r] = target[r] + product;"),
    "native loop: 1/U_jj factor dropped": (SWEEP, "E[row + r] = diff / dj;", "E[row + r] = diff;"),
}

# imports pbs2p from the current folder, not from an editable install of this tree
LAUNCHER = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "sys.path.insert(0, '.'); import pytest; sys.exit(pytest.main(sys.argv[1:]))")


def run_tests(edit: tuple[str, str, str] | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("pbs2p", "pbs2p_lab", "tests"):
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        if edit is not None:
            path, old, new = edit
            text = (work / path).read_text()
            if old not in text:
                raise SystemExit(f"{path} no longer holds {old!r}: update BUGS")
            (work / path).write_text(text.replace(old, new))
        env = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                              cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        imported = subprocess.run([sys.executable, "-c", LAUNCHER.split("; import pytest")[0] +
                                   "; import pbs2p; print(pbs2p.__file__)"], cwd=work, env=env,
                                  capture_output=True, text=True).stdout.strip()
    if not imported.startswith(tmp):
        raise SystemExit(f"the tests imported pbs2p from {imported}, not from the edited copy")
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    return {"returncode": proc.returncode, "first_failure": failed[0] if failed else None, "seconds": seconds,
            "tail": proc.stdout[-600:] if proc.returncode not in (0, 1) else ""}


def main() -> int:
    results = {"control (no edit)": {**run_tests(None), "edit": None}}
    print("control:", results["control (no edit)"]["returncode"], flush=True)
    for name, edit in BUGS.items():
        results[name] = {**run_tests(edit), "edit": list(edit)}
        print(f"{name}: {results[name]['first_failure']}", flush=True)
    control_ok = results["control (no edit)"]["returncode"] == 0
    caught = {k: r["returncode"] == 1 and r["first_failure"] is not None for k, r in results.items() if r["edit"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "injected_bugs.json").write_text(json.dumps({"tests": TESTS, "results": results,
                                                            "all_caught": all(caught.values()),
                                                            "control_passed": control_ok}, indent=1) + "\n")
    lines = ["# Injected bugs in the method core (`python benchmarks/injected_bugs.py`)", "",
             f"Tests: `pytest -x {' '.join(TESTS)}` on a copy of the tree with one edit. Control run without an "
             f"edit: {'passed' if control_ok else 'FAILED'} ({results['control (no edit)']['seconds']:.0f} s).", "",
             "| bug | file | edit | first failing test | s |", "|---|---|---|---|---:|"]
    for name, r in results.items():
        if r["edit"]:
            lines.append(f"| {name} | `{r['edit'][0]}` | `{r['edit'][1]}` → `{r['edit'][2]}` | "
                         f"{'`' + r['first_failure'] + '`' if caught[name] else '**none: survived**'} | "
                         f"{r['seconds']:.0f} |")
    lines += ["", f"Caught: {sum(caught.values())} of {len(caught)}."]
    (RESULTS / "injected_bugs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if control_ok and all(caught.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
