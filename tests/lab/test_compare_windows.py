"""``benchmarks/compare_windows.py``: two evaluations compared window by window, over a split of the windows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.compare_windows import main  # noqa: E402


def _eval_file(path: Path, nll: list[float], tokens: int, command: str) -> Path:
    ppl = {"ppl": math.exp(sum(nll) / (tokens * len(nll))), "window_nll": nll,
           "predicted_tokens": tokens * len(nll), "windows": len(nll)}
    path.write_text(json.dumps({"command": command, "entries": [{"label": "x", "perplexity": ppl}]}))
    return path


def test_rows_split_the_windows_and_name_the_worst(tmp_path, capsys):
    tokens = 10
    a = [20.0, 20.0, 30.0, 30.0, 30.0]
    b = [20.0, 40.0, 29.0, 28.0, 30.0]  # window 1 much worse, two of the rest better
    fa = _eval_file(tmp_path / "a.json", a, tokens, "eval a")
    fb = _eval_file(tmp_path / "b.json", b, tokens, "eval b")
    out = tmp_path / "cmp.md"
    assert main([str(fa), str(fb), "--first", "2", "--out", str(out)]) == 0
    md = out.read_text()
    assert md.startswith("# Window by window\n") and "(`eval a`)" in md and "(`eval b`)" in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    first = rows["first 2 (0–1)"].split(" | ")
    assert first[1] == f"{math.exp(40 / 20):.2f}" and first[2] == f"{math.exp(60 / 20):.2f}"
    assert first[5] == "0/2" and first[6] == f"1 ({math.exp(2.0):.2f}×, 2.00×) |"
    rest = rows["the rest (2–4)"].split(" | ")
    assert rest[5] == "2/3" and rest[4] == f"{math.exp(-0.1):.3f}"
    assert rows["all (0–4)"].split(" | ")[3] == f"{math.exp((147 - 130) / 50) - 1:+.2%}"
    assert capsys.readouterr().out.startswith("- A: `a.json`")


def test_refuses_files_of_other_windows(tmp_path):
    fa = _eval_file(tmp_path / "a.json", [1.0, 2.0, 3.0], 10, "a")
    fb = _eval_file(tmp_path / "b.json", [1.0, 2.0], 10, "b")
    with pytest.raises(SystemExit, match="different windows"):
        main([str(fa), str(fb), "--first", "1"])
    with pytest.raises(SystemExit, match="--first must be between 1 and 2"):
        main([str(fa), str(fa), "--first", "3"])
    record = json.loads(fa.read_text())
    record["entries"][0]["perplexity"]["predicted_tokens"] += 1
    fa.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="windows of unequal length"):
        main([str(fa), str(fb), "--first", "1"])
