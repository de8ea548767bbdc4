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
    env = dict(os.environ, TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "generated" / "pbs2p.BinarySparseTensor.html").is_file()


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
