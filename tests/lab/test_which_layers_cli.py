"""The ``pbs2p compress`` command compresses the layers that ``pbs2p.quantize_`` and ``calibrate`` do."""

from __future__ import annotations

import pytest
import torch

import pbs2p
from pbs2p import PBS2P, BinarySparseTensor
from pbs2p_lab.assets import load_model
from pbs2p_lab.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def compressed(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, mod in model.named_modules()
                  if isinstance(getattr(mod, "weight", None), BinarySparseTensor))


@pytest.mark.parametrize("calibrated", [False, True], ids=["data-free", "calibrated"])
def test_the_command_compresses_what_the_library_does(tmp_path, calibrated):
    options = ["--nsamples", "2", "--calib-seqlen", "16", "--no-cfs", "--tune-steps", "0"] if calibrated else [
        "--nsamples", "0"]
    assert main(["compress", "--model", "tiny", *options, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    by_command, _ = load_model(str(tmp_path / "c"))
    model, _ = load_model("tiny")
    if calibrated:
        pbs2p.calibrate(model, torch.randint(0, 100, (2, 16)), PBS2P(n=4, m=8), cfs=None, tuning=None, progress=False)
    else:
        pbs2p.quantize_(model, PBS2P(n=4, m=8))
    assert compressed(by_command) == compressed(model)
    assert len(compressed(model)) == 14 and "lm_head" not in compressed(model)
