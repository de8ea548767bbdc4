"""Failures leave the model whole: calibrate, observe→convert and scale tuning either finish or change nothing."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from helpers import snapshot_state, tiny_llama
from test_calibrate import calibration, tiny

import pbs2p
from pbs2p import PBS2P, BinarySparseTensor, ScaleTuning

calibrate_module = importlib.import_module("pbs2p.pipeline.calibrate")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert type(after[key]) is torch.Tensor and torch.equal(after[key], value), key


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("where", ["compress", "tuning"])
def test_a_failure_in_calibrate_puts_every_weight_back(monkeypatch, model_type, where):
    model = tiny_llama() if model_type == "llama" else tiny("gpt2")
    before = snapshot_state(model)
    modules_before = {name: type(mod) for name, mod in model.named_modules()}
    calls = {"n": 0}
    fail_at = (5 if model_type == "gpt2" else 9) if where == "compress" else 16  # in block 1, or mid-tuning

    def fail_on_the_ninth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Boom("induced")
        return original(*args, **kwargs)

    if where == "compress":
        original = calibrate_module.compress_parts
        monkeypatch.setattr(calibrate_module, "compress_parts", fail_on_the_ninth)
    else:
        from pbs2p.pipeline import scale_tuning

        original = scale_tuning._Tunable.dense
        monkeypatch.setattr(scale_tuning._Tunable, "dense", lambda self: fail_on_the_ninth(self))
    with pytest.raises(Boom):
        pbs2p.calibrate(model, calibration(vocab=128), PBS2P(n=4, m=8), progress=False)
    assert calls["n"] == fail_at
    assert_same(model, before)
    assert {name: type(mod) for name, mod in model.named_modules()} == modules_before  # GPT-2's Conv1D back
    assert getattr(model.config, "quantization_config", None) is None


def test_an_interrupted_calibrate_puts_every_weight_back(monkeypatch):
    model = tiny_llama()
    before = snapshot_state(model)
    original = calibrate_module.compress_parts
    calls = {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "compress_parts", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pbs2p.calibrate(model, calibration(), PBS2P(n=4, m=8), progress=False)
    assert_same(model, before)


@pytest.mark.parametrize("lr", [10.0, 0.5, 0.0, -1e-3, float("nan"), True])
def test_learning_rates_out_of_bounds_are_refused_before_anything_changes(lr):
    with pytest.raises(ValueError, match=r"lr must be a number in \(0, 0.1\]"):
        ScaleTuning(lr=lr)


def test_tuning_that_diverges_is_refused_and_the_block_keeps_its_untuned_scales(monkeypatch, caplog):
    from pbs2p.pipeline import scale_tuning

    monkeypatch.setattr(scale_tuning, "MAX_LR", 1e6)  # let a destructive learning rate through
    model, untuned = tiny_llama(), tiny_llama()
    with caplog.at_level(logging.WARNING, logger="pbs2p"):
        result = pbs2p.calibrate(model, calibration(vocab=128), PBS2P(n=4, m=8), tuning=ScaleTuning(lr=1e4),
                                 progress=False)
    reference = pbs2p.calibrate(untuned, calibration(vocab=128), PBS2P(n=4, m=8), tuning=None, progress=False)
    assert "scale tuning of block 0 refused" in caplog.text and "block 1" in caplog.text
    for record in result.blocks:
        assert record.tune["kept"] is False and record.tune["refused"]
    for (name, w), (_, ref) in zip(result.report.converted, reference.report.converted, strict=True):
        assert torch.isfinite(w.scale).all() and torch.isfinite(w.zero_point).all(), name
        assert torch.equal(w.qdata, ref.qdata) and torch.equal(w.scale, ref.scale), name  # exactly untuned


def test_kept_tuning_lowers_every_block_error():
    result = pbs2p.calibrate(tiny_llama(), calibration(vocab=128), PBS2P(n=4, m=8), tuning=ScaleTuning(steps=4),
                             progress=False)
    for record in result.blocks:
        if record.tune["kept"]:
            assert record.tune["after"] < record.tune["before"]
        else:
            assert record.tune["refused"]


def test_observe_convert_failure_keeps_the_observers_and_the_model(monkeypatch):
    from pbs2p import quantize as quantize_module

    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8, step="observe"))
    with torch.no_grad():
        model(calibration(2, vocab=256))
    before = snapshot_state(model)
    original, calls = quantize_module.compress_parts, {"n": 0}

    def fail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Boom("induced")
        return original(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "compress_parts", fail)
    with pytest.raises(Boom):
        pbs2p.quantize_(model, PBS2P(n=4, m=8, step="convert"))
    assert_same(model, before)
    observed = [m for m in model.modules() if getattr(m, "_pbs2p_observer", None) is not None]
    assert len(observed) == 14  # every linear of the 2 blocks; the LM head stays in full precision
    monkeypatch.setattr(quantize_module, "compress_parts", original)
    report = pbs2p.quantize_(model, PBS2P(n=4, m=8, step="convert"))  # the retry works
    assert len(report.converted) == 14 and not any(hasattr(m, "_pbs2p_observer") for m in model.modules())


def test_convert_with_another_config_is_refused_and_changes_nothing():
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8, step="observe"))
    with torch.no_grad():
        model(calibration(2, vocab=256))
    before = snapshot_state(model)
    with pytest.raises(ValueError, match=r"observed with another config \(differs in \['refine_rounds'\]\)"):
        pbs2p.quantize_(model, PBS2P(n=4, m=8, refine_rounds=1, step="convert"))
    assert_same(model, before)


def test_two_of_four_is_exactly_two_of_four_everywhere():
    model = tiny_llama()
    result = pbs2p.calibrate(model, calibration(vocab=128), PBS2P(n=2, m=4), progress=False)
    assert all(w.nm() == (2, 4) and w.is_2of4 for _, w in result.report.converted)
    assert all(b.n == 2 for b in result.blocks)
    with_cfs = pbs2p.calibrate(tiny_llama(), calibration(vocab=128), PBS2P(n=2, m=4), cfs=pbs2p.CFS(),
                               progress=False)  # asked for explicitly: blocks may differ
    assert {b.n for b in with_cfs.blocks} <= {1, 2, 3}
    assert not any(isinstance(w, BinarySparseTensor) and w.is_2of4 for _, w in with_cfs.report.converted
                   if w.nm() != (2, 4))


def test_smollm2_two_of_four_in_every_linear_and_honest_bits(smollm2):
    """The real model: 2:4 everywhere, and the bits are 1.25 per weight for the codes plus the scales."""
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids[:, :128]
    result = pbs2p.calibrate(model, ids, PBS2P(n=2, m=4), true_sequential=False, tuning=None, progress=False)
    assert len(result.report.converted) == 210
    for name, w in result.report.converted:
        assert w.nm() == (2, 4) and w.is_2of4, name
        out, cols = w.shape
        rows = -(-out // 64) * 64  # stored rows: whole tiles of 64
        expected = (rows * cols * 5 / 4 + 2 * out * 32) / (out * cols)  # 3-bit index + 2 signs per group, fp32 α, μ
        assert w.bits_per_weight() == pytest.approx(expected), name
