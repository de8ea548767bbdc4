"""Models and tokens that ``calibrate`` cannot compress are refused up front, clearly, with the model untouched."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot_state, tiny_llama

import pbs2p
from pbs2p import PBS2P

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def quantized() -> torch.nn.Module:
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8))
    return model


def partly_quantized() -> torch.nn.Module:
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: name.endswith("q_proj"))
    return model


def on_meta() -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_llama()


#: case -> (model factory, tokens, exception type, what the message must say)
CASES = {
    "already-quantized": (quantized, TOKENS, ValueError, "already holds 14 packed PBS2P weight"),
    "partly-quantized": (partly_quantized, TOKENS, ValueError, "model.layers.0.self_attn.q_proj.weight"),
    "meta-model": (on_meta, TOKENS, ValueError, "on the meta device"),
    "token-id-too-large": (tiny_llama, TOKENS + 250, ValueError, "outside the model's vocabulary"),
    "negative-token-id": (tiny_llama, TOKENS - 300, ValueError, "token id -"),
    "float-tokens": (tiny_llama, TOKENS.float(), TypeError, "integer tensor of token ids"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_calibration_model_refuses(case):
    from pbs2p.checks import check_calibration_model

    make, tokens, error, match = CASES[case]
    model = make()
    before = None if case == "meta-model" else snapshot_state(model)
    with pytest.raises(error, match=match):
        check_calibration_model(model, tokens)
    if before is not None:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_check_calibration_model_accepts_a_float_model():
    from pbs2p.checks import check_calibration_model

    check_calibration_model(tiny_llama(), TOKENS)
    check_calibration_model(tiny_llama(), TOKENS.int())


@pytest.mark.parametrize("case", [c for c in CASES if c != "float-tokens"])
def test_calibrate_refuses_clearly_and_changes_nothing(case):
    # were: aten.abs NotImplementedError, Tensor.item() on meta tensors, IndexError in the embedding
    make, tokens, error, match = CASES[case]
    model = make()
    before = None if case == "meta-model" else snapshot_state(model)
    with pytest.raises(error, match=match):
        pbs2p.calibrate(model, tokens, PBS2P(n=4, m=8), progress=False)
    if before is not None:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
