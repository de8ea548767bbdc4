"""Docs: the Sphinx site builds with warnings as errors; every public name has a runnable example."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pbs2p

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name", pbs2p.__all__)
def test_public_name_has_a_passing_example(name):
    obj = getattr(pbs2p, name)
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name, globs={}) if t.examples]
    assert tests, f"pbs2p.{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"the example of pbs2p.{name} fails"


def test_sphinx_builds_without_warnings(tmp_path):
    """``sphinx-build -n -W``: nitpicky (every cross-reference resolves), warnings as errors, offline."""
    env = dict(os.environ, TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    cmd = [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"),
           str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "generated" / "pbs2p.BinarySparseTensor.html").is_file()
    assert "--nm" in (tmp_path / "cli.html").read_text()  # the command-line reference, from the parser itself
    results = (tmp_path / "results.html").read_text()
    for plot in ("quality_heldout.png", "kernel_latency_targets.png", "ppl_vs_bits.png", "spbo-6_8_column.png"):
        assert plot in results and (tmp_path / "_images" / plot).is_file(), plot


def test_readme_plots_and_sections():
    """The README shows the committed plots (files that exist) and has the hardware and limitations sections."""
    import re

    text = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 4
    for image in images:
        assert image.startswith("benchmarks/results/") and (ROOT / image).is_file(), image
    for heading in ("## Supported hardware", "## Limitations", "## Tested versions"):
        assert f"\n{heading}\n" in text, heading


def test_readme_first_example_runs():
    """The README's opening example (a random model: no assets needed) runs as written."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    assert isinstance(scope["model"](torch.randn(2, 512)), torch.Tensor)
    assert isinstance(scope["y"], torch.Tensor) and scope["y"].shape == (3, 256)


def test_readme_imports_exist():
    """Every ``from pbs2p... import name`` line in the README and the quickstart names something real."""
    import importlib
    import re

    for doc in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        for module, names in re.findall(r"^from (pbs2p[\w.]*) import (.+)$", doc.read_text(), re.M):
            mod = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(mod, name.strip()), f"{doc.name}: {module}.{name.strip()} does not exist"


def _api_reference() -> set[str]:
    """Full names listed in the autosummary tables of docs/api.rst."""
    names, module = set(), ""
    for line in (ROOT / "docs" / "api.rst").read_text().splitlines():
        if line.startswith(".. currentmodule::"):
            module = line.split("::")[1].strip()
        elif line.startswith("   ") and not line.strip().startswith(":") and line.strip():
            names.add(f"{module}.{line.strip()}")
    return names


def _names_used(text: str) -> set[str]:
    """Names of pbs2p and pbs2p_lab a page uses: imported from them, cross-referenced, or written out in full."""
    import re

    names = {f"{module}.{name.strip()}" for module, names in re.findall(r"^from (pbs2p[\w.]*) import (.+)$", text, re.M)
             for name in names.split(",")}
    names |= {name.lstrip("~") for name in re.findall(r"\{py:\w+\}`([^`]+)`", text)}
    names |= set(re.findall(r"`((?:pbs2p|pbs2p_lab)(?:\.\w+)+)(?:\(\))?`", text))
    return names


def test_api_reference_covers_every_name_the_readme_and_docs_use():
    """Each pbs2p/pbs2p_lab name that the README or a docs page imports, cross-references or spells out in full
    is in docs/api.rst (a method or attribute through its class), and so is everything ``pbs2p`` exports."""
    listed = _api_reference()
    missing = sorted(f"pbs2p.{name} (exported by pbs2p)" for name in pbs2p.__all__ if f"pbs2p.{name}" not in listed)
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in sorted(_names_used(page.read_text())):
            if name not in listed and name.rsplit(".", 1)[0] not in listed:
                missing.append(f"{name} (used in {page.relative_to(ROOT)})")
    assert not missing, "docs/api.rst does not list: " + ", ".join(missing)


def _perplexities(record, windows: int):
    """Every perplexity over ``windows`` windows that a result file records (or that its window losses give)."""
    import math

    if isinstance(record, list):
        for item in record:
            yield from _perplexities(item, windows)
    elif isinstance(record, dict):
        counted = record.get("windows")
        detail = record.get("ppl_detail") or record.get("perplexity") or {}
        if isinstance(detail, dict):
            counted = detail.get("windows", counted)
        counted = len(counted) if isinstance(counted, list) else counted
        if isinstance(record.get("ppl"), float) and counted == windows:
            yield record["ppl"]
        losses = record.get("window_nll")
        if isinstance(losses, list) and len(losses) >= windows and "predicted_tokens" in record:
            per_window = record["predicted_tokens"] / len(losses)  # every window predicts seqlen - 1 tokens
            yield math.exp(sum(losses[:windows]) / (windows * per_window))
        for value in record.values():
            yield from _perplexities(value, windows)


def test_readme_perplexities_match_their_files():
    """Each row of the README's table of FP and 4:8 perplexities names its windows and result file(s); every
    number on it is what those files record over those windows (to the digits written)."""
    import json
    import re

    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- perplexity-sources -->", 1)[1].split("<!-- /perplexity-sources -->", 1)[0]
    assert "dequantized" in table and "Q4_1" in table  # the FP baseline says what it is
    rows = [line for line in table.splitlines() if re.match(r"\| [\d.]+[,| ]", line)]
    assert len(rows) >= 6
    for row in rows:
        numbers, _model, text_windows, _version, files = (cell.strip() for cell in row.strip("|").split("|"))
        windows = int(re.search(r"(\d+) × 2048", text_windows).group(1))
        records = [json.loads((ROOT / f).read_text()) for f in re.findall(r"`(benchmarks/results/[^`]+\.json)`", files)]
        assert records, f"no result file named on: {row}"
        found = [ppl for record in records for ppl in _perplexities(record, windows)]
        for number in numbers.split(", "):
            digits = len(number.split(".")[1]) if "." in number else 0
            assert any(round(ppl, digits) == float(number) for ppl in found), \
                f"{number} over {windows} windows is not in {files}: {sorted(round(p, 2) for p in found)}"



def test_readme_states_the_package_metadata():
    """The README and the quickstart state the Python version and the version ranges that pyproject.toml declares,
    and the exact versions they name are the ones constraints.txt pins."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = project["requires-python"].removeprefix(">=")
    ranges = [d for d in project["dependencies"] + project["optional-dependencies"]["lab"]
              if d.split(">")[0] in ("torch", "torchao", "transformers", "lm-eval")]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    for page in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        text = page.read_text()
        assert f"Python ≥ {python}" in text or f"Python {python}" in text, page.name
        for spec in ranges:
            assert f"`{spec}`" in text, f"{page.name} does not state {spec}"
        for name, version in re.findall(r"`(torch|torchao|transformers|lm-eval)==([\w.]+)`", text):
            assert pins[name.replace("-", "_") if name == "lm-eval" else name] == version, (page.name, name, version)
