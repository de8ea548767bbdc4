"""``benchmarks/layer_error.py`` end to end on the tiny model, and the held-out / calibration separation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.activations import capture_hessians, decoder_linears, shared_ngrams, token_sets  # noqa: E402
from benchmarks.layer_error import main, method_grid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _occurs_in(window: torch.Tensor, stream: torch.Tensor) -> bool:
    starts = (stream[: stream.numel() - window.numel() + 1] == window[0]).nonzero().flatten().tolist()
    return any(torch.equal(stream[s : s + window.numel()], window) for s in starts)


def test_heldout_windows_never_overlap_calibration_windows(tiny):
    from pbs2p_lab.data.calibration import tokenize_text
    from pbs2p_lab.data.split import load_split

    _, tok = tiny
    split = load_split()
    sets = token_sets(tok, split, n_cal=6, n_eval=6, seqlen=256, seed=0)
    cal_stream = tokenize_text(tok, split.calibration_text)
    held_stream = tokenize_text(tok, split.heldout_text)
    # every window comes from its own part of the split, and from that part only
    for w in sets.calibration:
        assert _occurs_in(w, cal_stream) and not _occurs_in(w, held_stream)
    for w in sets.heldout:
        assert _occurs_in(w, held_stream) and not _occurs_in(w, cal_stream)
    # no 32-token sequence of the held-out windows occurs in the calibration windows (and the check works)
    assert shared_ngrams(sets.calibration, sets.heldout, 32) == 0
    assert sets.record["shared_ngrams"] == {"n": 32, "count": 0}
    assert shared_ngrams(sets.calibration, sets.calibration[:1], 32) == 256 - 32 + 1
    assert {a.title for a in split.calibration}.isdisjoint({a.title for a in split.heldout})


def test_captured_hessians_are_the_inputs_of_each_linear(tiny):
    model, _ = tiny
    tokens = torch.randint(0, 1000, (2, 32))
    H = capture_hessians(model, tokens)
    names = [f"{i}.{n}" for i, n, _ in decoder_linears(model)]
    assert sorted(H) == sorted(names) and len(names) == 14
    assert H["0.self_attn.q_proj"] is H["0.self_attn.v_proj"] and H["1.mlp.gate_proj"] is H["1.mlp.up_proj"]
    seen = []
    lin = model.model.layers[1].mlp.down_proj
    handle = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    X = torch.cat(seen).double()
    assert torch.allclose(H["1.mlp.down_proj"].double(), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)


def test_layer_error_command_end_to_end(tmp_path, capsys):
    argv = [
        "--model",
        "tiny",
        "--layers",
        "all",
        "--n-cal",
        "2",
        "--n-eval",
        "2",
        "--seqlen",
        "64",
        "--patterns",
        "6:8",
        "--out",
        str(tmp_path),
        "--cache",
        str(tmp_path / "cache"),
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    record = json.loads((tmp_path / "layer_error.json").read_text())
    methods = method_grid([(6, 8)])
    assert len(record["entries"]) == 14 * len(methods)
    assert record["measurement"].startswith("isolation")
    assert record["activations"]["shared_ngrams"]["count"] == 0
    for e in record["entries"].values():
        assert math.isfinite(e["err_heldout"]) and e["err_heldout"] >= 0 and e["bits"] > 0
        if e["method"] == "fp16":
            assert e["err_heldout"] < 1e-2 and e["bits"] == 16
        elif e["family"] in ("spbo", "oneshot", "binarize"):
            assert e["err_heldout"] < 1.0  # the refit can only improve on Ŵ = 0
    readme = (tmp_path / "README.md").read_text()
    assert "spbo-6:8/column | binarize/column |" in readme and "| q | k | v | o | gate | up | down |" in readme
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == len(methods) - 1  # all but fp16
    out = capsys.readouterr().out
    assert "spbo-6:8/column < binarize/column" in out
    # resumable: a second run computes nothing new, reuses the cached activations, keeps the entries
    assert main(argv) == 0
    again = json.loads((tmp_path / "layer_error.json").read_text())
    assert again["entries"] == record["entries"] and again["runs"][-1]["new_entries"] == 0
    assert "activations: loaded" in capsys.readouterr().out
