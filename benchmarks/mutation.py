"""Mutation testing of the method core: how many injected bugs the algorithm tests catch.

    python benchmarks/mutation.py [--max-children 2]

Runs `mutmut <https://mutmut.readthedocs.io>`_ (configured in ``pyproject.toml``: it mutates
``pbs2p/algorithms/method.py``, ``cfs.py`` and ``hessian.py`` — operators, constants, arguments — and runs
``tests/library/algorithms/`` against every mutant), then writes the kill rate per file and the diff of every
surviving mutant to ``benchmarks/results/mutation/mutation.{json,md}``. A mutant is *killed* when a test
fails (or times out) with it, *survives* when every test passes. About an hour on 2 cores; an interrupted
run resumes where it stopped (mutmut keeps its verdicts in ``mutants/``). After tests were added,
``--retest-survivors`` tests again only the mutants that survived (a test added can only kill more; a killed
mutant stays killed), so the rate is that of the current tests without the full hour.

Two rates are written: over every mutant, and over the mutants that can fail on this machine. A mutant whose
only change is a ``device=`` argument (dropped or ``None``) builds the same tensor on a machine with one
device type, so no CPU test can tell it apart; those are listed as ``device-only`` and left out of the
second rate, never counted as killed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def mutmut(*args: str, check: bool = True) -> str:
    cmd = [sys.executable, "-m", "mutmut", *args]
    env = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def statuses() -> dict[str, str]:
    """``{mutant name: status}`` from ``mutmut results --all true``."""
    out = {}
    for line in mutmut("results", "--all", "true").splitlines():
        match = re.match(r"\s*([\w.]+__mutmut_\d+): (.+)$", line)
        if match:
            out[match.group(1)] = match.group(2).strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    ap.add_argument("--retest-survivors", action="store_true",
                    help="forget the verdicts of surviving mutants (kept in mutants/) and test them again")
    args = ap.parse_args(argv)
    if args.retest_survivors:
        print(f"testing again {forget_survivors()} surviving mutants", flush=True)
    start = time.perf_counter()
    log = mutmut("run", "--max-children", str(args.max_children), check=False)
    seconds = time.perf_counter() - start
    status = statuses()
    if not status:
        raise SystemExit("mutmut produced no results")
    unchecked = sorted(name for name, state in status.items() if state == "not checked")
    if unchecked:
        raise SystemExit(f"{len(unchecked)} mutants were not checked (e.g. {unchecked[0]}); mutmut said:\n"
                         + log[-3000:])
    per_file: dict[str, Counter] = {}
    for name, state in status.items():
        module = re.split(r"\.x(?:_|ǁ)", name, maxsplit=1)[0]  # pbs2p.algorithms.method.x_sweep__mutmut_3
        per_file.setdefault(module, Counter())[state] += 1
    survivors = sorted(name for name, state in status.items() if state not in KILLED)
    diffs = {name: mutmut("show", name, check=False) for name in survivors}
    device_only = sorted(name for name in survivors if _device_only(diffs[name]))
    total, killed = len(status), sum(state in KILLED for state in status.values())
    testable = total - len(device_only)
    keys = sorted({s for c in per_file.values() for s in c})
    untraced = sorted({re.sub(r"__mutmut_\d+$", "", name) for name, state in status.items() if state == "no tests"})
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    record = {
        "command": "python benchmarks/mutation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mutated": config["only_mutate"],
        "tests": ", ".join(config["pytest_add_cli_args_test_selection"])
        + " (test_pins.py deselected: it runs the library in a subprocess)",
        "mutants": total, "killed": killed, "kill_rate": killed / total,
        "seconds_this_invocation": round(seconds),  # verdicts kept in mutants/ by earlier invocations are reused
        "device_only": len(device_only), "kill_rate_without_device_only": killed / testable,
        "by_status": dict(Counter(status.values())),
        "by_file": {module: dict(counts) for module, counts in sorted(per_file.items())},
        "survivors": {name: {"status": status[name], "device_only": name in device_only, "diff": diffs[name]}
                      for name in survivors},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# Mutation testing of the method core", "",
        f"`{record['command'].strip()}`: mutmut mutated {', '.join(record['mutated'])} and ran {record['tests']} "
        f"against every mutant ({record['seconds_this_invocation']} s in the last invocation; mutmut keeps the "
        "verdicts of earlier ones in `mutants/`).", "",
        f"**{killed} of {total} mutants killed: {killed / total:.1%}.** {len(device_only)} survivors only change a "
        f"`device=` argument (the same tensor on a one-device machine); without them: {killed} of {testable}, "
        f"{killed / testable:.1%}.", "",
        f"*no tests* ({', '.join(untraced) or 'none'}): mutmut saw no selected test call the function in its own "
        "process (a test that runs it only in spawned processes cannot be traced); counted as not killed.", "",
        "| module | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for module, counts in sorted(per_file.items()):
        lines.append(f"| {module} | " + " | ".join(str(counts.get(k, 0)) for k in keys) + " |")
    if survivors:
        lines += ["", "## Surviving mutants", ""]
        for name in survivors:
            tag = " (device-only)" if name in device_only else ""
            lines += [f"### `{name}`{tag}", "", "```diff", diffs[name].strip(), "```", ""]
    (RESULTS / "mutation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    return 0


def forget_survivors() -> int:
    """Set the verdict of every surviving mutant in ``mutants/**/*.meta`` back to *not checked*."""
    survivors = {name for name, state in statuses().items() if state not in KILLED}
    forgotten = 0
    for meta in (ROOT / "mutants").rglob("*.meta"):
        data = json.loads(meta.read_text())
        codes = data.get("exit_code_by_key", {})
        names = survivors & codes.keys()
        if names:
            codes.update(dict.fromkeys(names))
            meta.write_text(json.dumps(data, indent=4))
            forgotten += len(names)
    return forgotten


def _device_only(diff: str) -> bool:
    """Whether a mutant's diff changes nothing but a ``device=`` argument (dropped, or set to ``None``)."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    if len(removed) != 1 or len(added) != 1:
        return False

    def strip(line: str) -> str:
        return re.sub(r",?\s*device=[\w.]+", "", line).replace(", )", ")").replace(" ", "")

    return "device=" in removed[0] and strip(removed[0]) == strip(added[0])


if __name__ == "__main__":
    sys.exit(main())
