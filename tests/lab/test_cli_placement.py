"""``--device`` and ``--dtype`` of ``pbs2p compress``/``run``/``eval``: what they accept, refuse, and record."""

from __future__ import annotations

import json

import pytest
import torch

from pbs2p_lab.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parser_takes_device_and_dtype():
    parser = build_parser()
    for command in (["compress", "--model", "m", "--out", "x"], ["run"], ["eval", "--model", "m"]):
        args = parser.parse_args(command)
        assert (args.device, args.dtype) == ("cpu", "float32")  # the defaults: what ran before
        args = parser.parse_args([*command, "--device", "cuda:1", "--dtype", "bf16"])
        assert (args.device, args.dtype) == ("cuda:1", "bfloat16")
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--dtype", "int8"])


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "tpu9000"], "is not a device name"),
    (["--dtype", "float16"], "float16 needs an accelerator"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "sees no cuda device")]))
def test_unavailable_placements_are_refused_before_loading(tmp_path, capsys, flags, message):
    assert main(["compress", "--model", "tiny", "--nsamples", "0", "--out", str(tmp_path / "x"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_compress_in_bfloat16_saves_bfloat16_and_records_it(tmp_path):
    folder = tmp_path / "bf16"
    assert main(["compress", "--model", "tiny", "--nsamples", "2", "--calib-seqlen", "32", "--dtype", "bfloat16",
                 "--device", "cpu", "--tune-steps", "1", "--out", str(folder), "--no-progress"]) == 0
    meta = json.loads((folder / "pbs2p_compress.json").read_text())
    assert (meta["device"], meta["dtype"], meta["compressed_linears"]) == ("cpu", "bfloat16", 14)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(folder), "--dtype", "bf16", "--seqlen", "32", "--ppl-limit", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["entries"][0]["perplexity"]["windows"] == 1
