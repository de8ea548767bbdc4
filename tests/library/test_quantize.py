"""quantize_ with PBS2P: what is converted, what is skipped, refusals that change nothing."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, tiny_llama
from torchao.quantization import quantize_ as torchao_quantize_

import pbs2p
from pbs2p import PBS2P, BinarySparseTensor


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert type(after[key]) is torch.Tensor, key
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("n", "m"), [(4, 8), (2, 4)])
def test_mlp_converts_every_eligible_linear(n, m):
    model = mlp()
    torchao_quantize_(model, PBS2P(n=n, m=m))
    for name, mod in linears(model).items():
        eligible = mod.in_features % m == 0
        assert isinstance(mod.weight, BinarySparseTensor) == eligible, name
        if eligible:
            x = torch.randn(3, mod.in_features)
            torch.testing.assert_close(
                mod(x), F.linear(x, mod.weight.dequantize(), mod.bias), rtol=1e-5, atol=1e-5
            )
    assert model(torch.randn(7, 64)).shape == (7, 10)


def test_tiny_llama_converts_every_linear():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    report = pbs2p.quantize_(model, PBS2P(n=4, m=8))
    names = [name for name, _ in report.converted]
    assert len(names) == 2 * 7  # q k v o gate up down per layer; the LM head is kept unless asked
    assert report.skipped == [("lm_head", pbs2p.quantize.HEAD)]
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64)
    torch.testing.assert_close(q(x), F.linear(x, q.weight.dequantize(), q.bias), rtol=1e-5, atol=1e-5)


def test_report_lists_skips_with_reasons(caplog):
    model = mlp()
    with caplog.at_level(logging.INFO, logger="pbs2p"):
        report = pbs2p.quantize_(model, PBS2P(n=4, m=16))
    assert [name for name, _ in report.converted] == ["0", "2", "4"]
    assert report.skipped == [("6", "in_features = 24 is not a multiple of M = 16")]
    assert "skipped 6: in_features = 24" in caplog.text
    again = pbs2p.quantize_(model, PBS2P(n=2, m=8))  # converts "6"; converted ones stay as they are
    assert model[0].weight.nm() == (4, 16) and model[6].weight.nm() == (2, 8)
    assert str(again).startswith("4 linear(s) converted, 0 skipped")
    assert 0 < again.bits_per_weight() < 3


def test_non_float_weight_is_skipped():
    model = mlp()
    model[0].weight = torch.nn.Parameter(torch.ones(128, 64, dtype=torch.int32), requires_grad=False)
    report = pbs2p.quantize_(model, PBS2P(n=4, m=8))
    assert dict(report.skipped)["0"] == "weight dtype torch.int32 is not floating point"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_refused_and_model_unchanged(bad):
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.data[3, 5] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'model.layers.1.mlp.down_proj' has 1 NaN/Inf"):
        pbs2p.quantize_(model, PBS2P(n=4, m=8))
    assert_unchanged(model, before)


def test_torchao_walk_refuses_the_bad_module_before_changing_it():
    """torchao's quantize_ hands over one module at a time: the bad one is refused and left as it is."""
    model = tiny_llama()
    bad = model.model.layers[1].mlp.down_proj
    bad.weight.data[3, 5] = float("nan")
    before = bad.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\(in_features=128, out_features=64\)' has 1 NaN/Inf.*pbs2p.quantize_"):
        torchao_quantize_(model, PBS2P(n=4, m=8))
    assert type(bad.weight) is torch.nn.Parameter
    torch.testing.assert_close(bad.weight.detach(), before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 8, "m": 8}, "need 1 <= N < M"),
        ({"n": 0, "m": 4}, "need 1 <= N < M"),
        ({"n": 2, "m": 6}, "M = 6 is not supported"),
        ({"spbo_steps": -1}, "spbo_steps must be >= 0"),
        ({"refine_rounds": -1}, "refine_rounds must be >= 0"),
        ({"scale_block": 100}, "scale_block must be a multiple of m = 8"),
        ({"scale_block": 0}, "scale_block must be >= 1"),
        ({"compensation": "magic"}, "compensation must be one of"),
        ({"extras": ("act_order", "magic")}, r"extras: unknown \['magic'\]"),
        ({"step": "calibrate"}, "step must be one of"),
    ],
)
def test_invalid_config_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PBS2P(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": True}, "must be integers"),
        ({"m": 8.0}, "must be integers"),
        ({"scale_block": 8.0}, "scale_block must be an int"),
        ({"refine_rounds": 2.5}, "refine_rounds must be an int"),
        ({"refine_rounds": None}, "refine_rounds must be an int"),
        ({"spbo_steps": True}, "spbo_steps must be an int"),
        ({"extras": "no"}, "extras must be a list"),
        ({"extras": (1,)}, "extras must be a list"),
        ({"method": "oneshot"}, "unexpected keyword argument 'method'"),
        ({"seed": 3}, "unexpected keyword argument 'seed'"),
        ({"tune_steps": 3}, "unexpected keyword argument 'tune_steps'"),
    ],
)
def test_wrong_types_and_removed_options_refused(kwargs, match):
    with pytest.raises(TypeError, match=match):
        PBS2P(**kwargs)


def test_empty_model_refused():
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(5, 3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no linear of this Sequential can be converted"):
        pbs2p.quantize_(model, PBS2P(n=4, m=8))
    assert_unchanged(model, before)


def test_parameter_name():
    model = mlp()
    torchao_quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: name == "0")
    assert isinstance(model[0].weight, BinarySparseTensor)
    assert not isinstance(model[2].weight, BinarySparseTensor)
    from pbs2p.quantize import _pbs2p_transform

    lin = torch.nn.Linear(16, 4)
    lin.register_parameter("other", torch.nn.Parameter(torch.randn(4, 16)))
    _pbs2p_transform(lin, PBS2P(n=4, m=8), parameter_name="other")
    assert isinstance(lin.other, BinarySparseTensor) and not isinstance(lin.weight, BinarySparseTensor)


def test_observe_convert_uses_data():
    model = tiny_llama()
    data_free = copy.deepcopy(model)
    torchao_quantize_(data_free, PBS2P(n=4, m=8))
    torchao_quantize_(model, PBS2P(n=4, m=8, step="observe"))
    with torch.no_grad():
        for seed in range(2):
            model(torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(seed)))
    torchao_quantize_(model, PBS2P(n=4, m=8, step="convert"))
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q.weight, BinarySparseTensor) and not hasattr(q, "_pbs2p_observer")
    assert not torch.equal(q.weight.qdata, data_free.model.layers[0].mlp.down_proj.weight.qdata)


def test_convert_without_calibration_refused():
    model = tiny_llama()
    torchao_quantize_(model, PBS2P(n=4, m=8, step="observe"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="saw no calibration input"):
        torchao_quantize_(model, PBS2P(n=4, m=8, step="convert"))
    assert_unchanged(model, before)


def test_the_lm_head_is_converted_only_when_asked():
    model = tiny_llama()
    assert not model.config.tie_word_embeddings
    report = pbs2p.quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear))
    assert "lm_head" in dict(report.converted)


@pytest.mark.parametrize("via", ["pbs2p", "torchao"])
def test_modules_that_are_not_linears_are_refused_by_name(via):
    model = tiny_llama()
    before = snapshot(model)
    pick = lambda mod, name: name in ("model.embed_tokens", "model.layers.0.mlp.down_proj")  # noqa: E731
    with pytest.raises(ValueError, match="nn.Linear weights only"):
        if via == "pbs2p":
            pbs2p.quantize_(model, PBS2P(n=4, m=8), filter_fn=pick)
        else:
            from torchao.quantization import FqnToConfig

            torchao_quantize_(model, FqnToConfig({"model.embed_tokens": PBS2P(n=4, m=8)}), filter_fn=None)
    assert_unchanged(model, before)
