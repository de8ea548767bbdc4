"""lm-eval's own command line on a compressed folder (``python -m pbs2p_lab.lm_eval``), as ``pbs2p eval`` scores it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pbs2p_lab.cli import main
from pbs2p_lab.eval.task_configs import prepare_tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

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
    """``benchmarks/lm_eval_agreement.py`` (what the SmolLM2 result of the README comes from) on the tiny folder."""
    from benchmarks.lm_eval_agreement import main as agreement

    assert agreement(["--model", str(folder), "--tasks", "rte,arc_easy", "--limit", "12", "--batch-size", "4",
                      "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"agreement_{folder.name}.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in record["rows"]}
    assert set(rows) == {("rte", "acc"), ("arc_easy", "acc"), ("arc_easy", "acc_norm")}
    for r in rows.values():
        assert r["n"] == [12, 12] and r["pbs2p_eval"] == r["lm_eval"] is not None and r["equal"]
    assert record["lm_eval_command"][:4] == ["python", "-m", "pbs2p_lab.lm_eval", "run"]


def test_without_the_import_the_stock_command_names_the_missing_class(folder, tmp_path):
    result = lm_eval_command(["run", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "rte",
                              "--include_path", str(prepare_tasks(["rte"])), "--limit", "1"], hook=False)
    assert result.returncode != 0
    assert "Failed to find class PBS2P" in result.stderr
