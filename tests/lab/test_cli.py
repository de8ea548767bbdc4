"""The ``pbs2p`` command line on the tiny model: eval, compress, run, report, errors."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from pbs2p_lab.cli import build_parser, main
from pbs2p_lab.data.calibration import DEFAULT_NSAMPLES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parser_understands_the_commands():
    parser = build_parser()
    args = parser.parse_args(["run", "--nm", "6:8", "--ppl-limit", "all", "--tasks", "piqa,boolq"])
    assert args.nm == (6, 8) and args.ppl_limit is None and args.tasks == ("piqa", "boolq")
    assert args.nsamples == DEFAULT_NSAMPLES == 8  # the stated calibration default
    args = parser.parse_args(["compress", "--model", "m", "--out", "x", "--nsamples", "0", "--spbo-steps", "0"])
    assert args.nsamples == 0 and args.spbo_steps == 0 and args.nm == (4, 8)
    args = parser.parse_args(["compress", "--model", "m", "--out", "x", "--extras", "refit,act_order",
                              "--compensation", "block"])
    assert args.extras == ("refit", "act_order") and args.compensation == "block"
    assert parser.parse_args(["eval", "--model", "m", "--tasks", "default"]).tasks[:2] == ("piqa", "arc_easy")
    # names beyond the bundled tasks go to lm-eval (checked before the model loads: test_cli_ecosystem.py)
    assert parser.parse_args(["eval", "--model", "m", "--tasks", "mmlu,piqa"]).tasks == ("mmlu", "piqa")
    for bad in (["run", "--nm", "4-8"], ["eval", "--model", "m", "--tasks", ","],
                ["eval", "--model", "m", "--limit", "0"],
                ["compress", "--model", "m", "--out", "x", "--compensation", "magic"],
                ["compress", "--model", "m", "--out", "x", "--extras", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_eval_writes_a_result(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert main(["eval", "--model", "tiny", "--seqlen", "64", "--ppl-limit", "2", "--tasks", "rte",
                 "--limit", "3", "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["schema"] == "pbs2p-result-v1" and record["model"]["name"] == "tiny"
    (entry,) = record["entries"]
    assert entry["method"] == "fp" and entry["bits_per_weight"] == 32.0
    assert entry["perplexity"]["windows"] == 2 and entry["zeroshot"]["tasks"]["rte"]["n"] == 3
    assert record["split"]["heldout"]["titles"] and record["versions"]["torch"]
    assert "| tiny | fp32 |" in capsys.readouterr().out


def test_compress_data_free_then_eval_and_report(tmp_path):
    folder = tmp_path / "tiny48"
    assert main(["compress", "--model", "tiny", "--nsamples", "0", "--out", str(folder)]) == 0
    meta = json.loads((folder / "pbs2p_compress.json").read_text())
    assert meta["compressed_linears"] == 14 and meta["nm"] == "4:8"  # 2 blocks x 7 linears, no lm_head
    assert 1 < meta["bits_per_weight"] < 32 and len(meta["per_layer"]) == 14
    out = tmp_path / "c.json"
    assert main(["eval", "--model", str(folder), "--seqlen", "64", "--ppl-limit", "2", "--out", str(out),
                 "--no-progress"]) == 0
    entry = json.loads(out.read_text())["entries"][0]
    assert entry["method"] == "pbs2p-spbo-datafree" and entry["bits_per_weight"] == meta["bits_per_weight"]
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "README.md").read_text().count("| tiny |") == 1
    assert (tmp_path / "report" / "ppl_vs_bits.png").stat().st_size > 0


def test_compress_calibrated_records_the_calibration(tmp_path):
    folder = tmp_path / "tiny68"
    assert main(["compress", "--model", "tiny", "--nm", "6:8", "--nsamples", "4", "--calib-seqlen", "32",
                 "--no-cfs", "--out", str(folder), "--no-progress"]) == 0
    meta = json.loads((folder / "pbs2p_compress.json").read_text())
    assert meta["method"] == "pbs2p-spbo" and meta["config"]["calibrate"]["cfs"] is None
    assert meta["calibration"]["nsamples"] == 4 and meta["calibration"]["seqlen"] == 32
    assert meta["bits_per_weight_kept"] == pytest.approx(0.75)
    assert all("output_rel_error" in layer for layer in meta["per_layer"])
    assert meta["split"]["heldout"]["titles"]


def test_bad_compression_option_is_a_clean_error(capsys):
    assert main(["compress", "--model", "tiny", "--nm", "4:8", "--scale-block", "12", "--out", "unused"]) == 2
    assert "invalid compression options" in capsys.readouterr().err
    assert main(["compress", "--model", "tiny", "--nsamples", "0", "--compensation", "block", "--out", "unused"]) == 2
    assert "act only with calibration data" in capsys.readouterr().err


def test_run_compares_fp_and_compressed(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["run", "--model", "tiny", "--nsamples", "0", "--seqlen", "64", "--ppl-limit", "2",
                 "--out", str(out), "--no-progress"]) == 0
    fp, compressed = json.loads(out.read_text())["entries"]
    assert fp["method"] == "fp" and compressed["nm"] == "4:8"
    assert compressed["size_mb"] < fp["size_mb"] and compressed["bits_per_weight"] < 32
    assert "compress" in compressed["wall_s"] and "load" in fp["wall_s"]
    printed = capsys.readouterr().out
    assert "pbs2p 4:8 (data-free)" in printed and "| 0.500 |" in printed  # kept-only bits column


def test_missing_asset_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PBS2P_CACHE", str(tmp_path))
    monkeypatch.setenv("PBS2P_OFFLINE", "1")
    assert main(["fetch", "tiny"]) == 2
    assert "PBS2P_OFFLINE" in capsys.readouterr().err


def test_python_dash_m_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m pbs2p_lab", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("pbs2p_lab", run_name="__main__")
    assert info.value.code == 0
    assert "compress" in capsys.readouterr().out


def test_report_from_synthetic_records(tmp_path):
    from pbs2p_lab.report import load_rows, markdown_table, write_report

    def entry(label, method, bits, ppl, layers=None):
        return {"label": label, "method": method, "nm": "4:8" if layers else None, "bits_per_weight": bits,
                "bits_per_weight_kept": 0.5 if layers else None, "size_mb": 10.0,
                "perplexity": {"ppl": ppl, "windows": 3, "seqlen": 64}, "per_layer": layers, "wall_s": {"ppl": 1.0},
                "zeroshot": {"tasks": {"piqa": {"acc": 0.625, "acc_norm": 0.5, "n": 8}}}}

    layers = [{"name": f"l{i}", "weight_rel_error": 0.5, "output_rel_error": 0.1 * (i + 1)} for i in range(4)]
    record = {"schema": "pbs2p-result-v1", "model": {"name": "m"},
              "entries": [entry("fp32", "fp", 32.0, 17.5), entry("pbs2p", "pbs2p-spbo", 1.37, 90.0, layers)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    table = markdown_table(load_rows([path]))
    assert "| m | pbs2p | pbs2p-spbo | 4:8 | 1.370 | 0.500 | 10.00 | 90.00 | 3×64 | 0.500 | 1 |" in table
    assert "acc_norm where the task has it" in table
    readme = write_report([path], tmp_path / "out")
    assert "ppl_vs_bits.png" in readme.read_text() and (tmp_path / "out" / "ppl_vs_bits.png").exists()
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a pbs2p result"):
        load_rows([path])
    path.write_text("{truncated")
    with pytest.raises(ValueError, match="cannot read the result file"):
        write_report([path], tmp_path / "out")


def test_report_reads_every_committed_result_file(tmp_path):
    from pathlib import Path

    files = sorted(str(p) for p in (Path(__file__).parents[2] / "benchmarks" / "results").glob("*/*.json"))
    assert len(files) >= 10
    assert main(["report", *files, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.count("\n## `") == len(files)
    # every table names its metric: perplexity with its windows, accuracy as a fraction of acc_norm/acc
    heldout = text.split("quality/quality_heldout.json` (quality)")[1].split("\n## ")[0]
    assert "| method | perplexity | windows×seqlen |" in heldout and "| pbs2p-4:8 | 687.15 | 16×2048 |" in heldout
    assert "Zero-shot accuracy (fraction; acc_norm where the task has it, else acc)" in heldout
    assert "| pbs2p-6:8 | not recorded (N varies: CFS) | 7×15, 5×15 |" in heldout  # not "no CFS"
    fp = text.split("fp/smollm2_fp32_zeroshot_limit200.json` (evaluation)")[1].split("\n## ")[0]
    assert "zero-shot accuracy as a fraction (acc_norm where the task has it, else acc)" in fp
