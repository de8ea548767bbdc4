"""lm-eval's own command line on a compressed folder (``python -m pbs2p_lab.lm_eval``), as ``pbs2p eval`` scores it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pbs2p_lab.cli import main
from pbs2p_lab.eval.task_configs import prepare_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1",
           "OMP_NUM_THREADS": "1"}


def lm_eval_command(args: list[str], *, hook: bool) -> subprocess.CompletedProcess:
    """``lm_eval ARGS`` as the stock command runs it (lm-eval's CLI entry), with or without the pbs2p import."""
    entry = ["-m", "pbs2p_lab.lm_eval"] if hook else ["-c", "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"]
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **OFFLINE})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval") / "tiny48"
    assert main(["compress", "--model", "tiny", "--nsamples", "0", "--out", str(out), "--no-progress"]) == 0
    return out


def test_lm_eval_command_scores_a_compressed_folder_as_pbs2p_eval(folder, tmp_path):
    ours = tmp_path / "pbs2p.json"
    assert main(["eval", "--model", str(folder), "--no-ppl", "--tasks", "rte", "--limit", "12", "--batch-size", "4",
                 "--out", str(ours), "--no-progress"]) == 0
    expected = json.loads(ours.read_text())["entries"][0]["zeroshot"]["tasks"]["rte"]
    result = lm_eval_command(["run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
                              "--tasks", "rte", "--include_path", str(prepare_tasks(["rte"])), "--limit", "12",
                              "--batch_size", "4", "--output_path", str(tmp_path / "out")], hook=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(path.read_text())
    assert got["n-samples"]["rte"]["effective"] == expected["n"] == 12
    assert got["results"]["rte"]["acc,none"] == expected["acc"]


def test_without_the_import_the_stock_command_names_the_missing_class(folder, tmp_path):
    result = lm_eval_command(["run", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "rte",
                              "--include_path", str(prepare_tasks(["rte"])), "--limit", "1"], hook=False)
    assert result.returncode != 0
    assert "Failed to find class PBS2P" in result.stderr
