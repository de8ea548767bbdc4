"""The ``pbs2p`` command refuses bad requests with one line and exit status 2, before any expensive work, and
leaves the user's files as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pbs2p_lab import assets, cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model (the refusals must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing")

    monkeypatch.setattr(assets, "load_model", refuse)


def one_line_error(capsys, code: int, expect: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and expect in err, err
    return err


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's refusals
        return int(exc.code)


# argument values: refused by argparse, before anything is imported or loaded
BAD_VALUES = {
    "calib-seqlen-0": (["compress", "--out", "o", "--calib-seqlen", "0"], "--calib-seqlen: must be >= 1"),
    "seqlen-0": (["eval", "--seqlen", "0"], "--seqlen: must be >= 1"),
    "seqlen-negative": (["run", "--seqlen", "-5"], "--seqlen: must be >= 1"),
    "nsamples-negative": (["compress", "--out", "o", "--nsamples", "-3"], "--nsamples: must be >= 0"),
    "batch-size-0": (["eval", "--batch-size", "0"], "--batch-size: must be >= 1"),
    "batch-size-text": (["eval", "--batch-size", "many"], "expected an integer"),
    "scale-block-0": (["compress", "--out", "o", "--scale-block", "0"], "--scale-block: must be >= 1"),
    "tune-steps-negative": (["compress", "--out", "o", "--tune-steps", "-1"], "--tune-steps: must be >= 0"),
    "n-low-0": (["compress", "--out", "o", "--n-low", "0"], "--n-low: must be >= 1"),
    "limit-text": (["eval", "--limit", "some"], "a limit is a positive number"),
    "ppl-limit-0": (["run", "--ppl-limit", "0"], "a limit is a positive number"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_refused_by_the_parser(case, capsys, no_loading):
    argv, expect = BAD_VALUES[case]
    one_line_error(capsys, run(argv), expect)


def _file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("mine")
    return tmp / "notes.txt"


def _foreign(tmp: Path) -> Path:
    (tmp / "thesis").mkdir()
    (tmp / "thesis" / "chapter1.tex").write_text("years of work")
    return tmp / "thesis"


#: case -> (argv built from a temporary folder, what the error says)
BAD_REQUESTS = {
    "compress-out-is-a-file": (lambda t: ["compress", "--model", "tiny", "--out", str(_file(t))], "is a file"),
    "compress-out-not-ours": (lambda t: ["compress", "--model", "tiny", "--out", str(_foreign(t))],
                              "not written by pbs2p compress"),
    "compress-out-under-a-file": (lambda t: ["compress", "--model", "tiny", "--out", str(_file(t) / "x")],
                                  "is a file, not a folder"),
    "eval-out-is-a-folder": (lambda t: ["eval", "--model", "tiny", "--out", str(t)], "is a folder"),
    "run-out-under-a-file": (lambda t: ["run", "--model", "tiny", "--out", str(_file(t) / "r.json")],
                             "is a file, not a folder"),
    "report-missing-json": (lambda t: ["report", str(t / "absent.json"), "--out", str(t / "r")], "does not exist"),
    "report-truncated-json": (lambda t: ["report", str(_truncated(t)), "--out", str(t / "r")], "not valid JSON"),
    "report-not-a-result": (lambda t: ["report", str(_json(t, [1, 2])), "--out", str(t / "r")], "not an object"),
    "report-out-is-a-file": (lambda t: ["report", str(_json(t, {"entries": []})), "--out", str(_file(t))],
                             "is a file"),
    "eval-truncated-compress-record": (lambda t: ["eval", "--model", str(_truncated_record(t))], "not valid JSON"),
}


def _truncated(tmp: Path) -> Path:
    (tmp / "cut.json").write_text('{"schema": "pbs2p-result-v1", "entries": [{"lab')
    return tmp / "cut.json"


def _json(tmp: Path, data: object) -> Path:
    (tmp / "data.json").write_text(json.dumps(data))
    return tmp / "data.json"


def _truncated_record(tmp: Path) -> Path:
    folder = tmp / "compressed"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pbs2p_compress.json").write_text('{"model": {"na')
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_before_loading(case, tmp_path, capsys, no_loading):
    make, expect = BAD_REQUESTS[case]
    argv = make(tmp_path)
    before = _tree(tmp_path)
    one_line_error(capsys, run(argv), expect)
    assert _tree(tmp_path) == before


def test_a_path_that_does_not_exist(capsys, tmp_path):
    one_line_error(capsys, run(["eval", "--model", str(tmp_path / "no" / "such" / "model")]), "no such folder")
    one_line_error(capsys, run(["eval", "--model", "./typo_model"]), "no such folder")


def test_a_hub_id_while_offline(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    err = one_line_error(capsys, run(["eval", "--model", "nobody-here/no-such-model-xyz"]), "hub id")
    assert "no-such-model-xyz" in err


def test_a_damaged_compressed_folder(capsys, tmp_path, tiny):
    import torch

    import pbs2p
    from pbs2p import PBS2P

    model, tokenizer = tiny
    model = type(model)(model.config)
    pbs2p.quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear)
                    and ".layers." in name)
    out = assets.save_compressed(model, tokenizer, tmp_path / "c", {"model": {"name": "tiny"}})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, run(["eval", "--model", str(out), "--seqlen", "16", "--ppl-limit", "1"]),
                   "quantization_config")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder(capsys, tmp_path, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line_error(capsys, run(["compress", "--model", "tiny", "--out", str(locked / "out")]), "permission")
    finally:
        locked.chmod(0o755)
