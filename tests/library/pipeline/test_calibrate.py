"""calibrate: block-by-block compression of causal LMs of several families."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot_state, tiny_llama

import pbs2p
from pbs2p import PBS2P, BinarySparseTensor
from pbs2p.pipeline import decoder_blocks


def tiny(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"vocab_size": 128}
    kwargs = {
        "qwen2": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "gemma3_text": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=None,
        ),
        "opt": dict(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64
        ),
        "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=128),
    }[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **common, **kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


def calibration(n: int = 4, seq: int = 32, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text", "opt", "gpt2"])
def test_families_convert_every_block_linear(model_type):
    model = tiny(model_type)
    result = pbs2p.calibrate(model, calibration(), PBS2P(n=4, m=8), progress=False)
    blocks = decoder_blocks(model)
    for block in blocks:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(isinstance(m.weight, BinarySparseTensor) for m in linears)
    assert len(result.blocks) == len(blocks)
    assert all(0 <= e < 1.5 for b in result.blocks for e in b.errors.values())
    with torch.no_grad():
        assert torch.isfinite(model(calibration(1)).logits).all()


def test_cfs_keeps_the_exact_average():
    model = tiny_llama()
    result = pbs2p.calibrate(
        model, calibration(vocab=256), PBS2P(n=5, m=8), cfs=pbs2p.CFS(n_low=3, n_high=7), progress=False
    )
    assert result.report.kept_fraction() == 5 / 8
    for record in result.blocks:
        assert record.cosine is not None and 3 <= record.n <= 7
        block = model.model.layers[record.index]
        assert block.mlp.down_proj.weight.nm() == (record.n, 8)


def test_without_cfs_every_block_keeps_n():
    model = tiny_llama()
    result = pbs2p.calibrate(model, calibration(vocab=256), PBS2P(n=2, m=4), cfs=None, progress=False)
    assert {b.n for b in result.blocks} == {2} and all(b.cosine is None for b in result.blocks)
    assert dict(result.report.skipped)["lm_head"].startswith("outside the decoder blocks")


def test_calibration_changes_the_result():
    data_free, calibrated = tiny_llama(), tiny_llama()
    pbs2p.quantize_(data_free, PBS2P(n=4, m=8))
    pbs2p.calibrate(calibrated, calibration(vocab=256), PBS2P(n=4, m=8), cfs=None, progress=False)
    a = data_free.model.layers[1].self_attn.o_proj.weight
    b = calibrated.model.layers[1].self_attn.o_proj.weight
    assert not torch.equal(a.qdata, b.qdata)


def test_deterministic():
    runs = []
    for _ in range(2):
        model = tiny_llama()
        pbs2p.calibrate(model, calibration(vocab=256), PBS2P(n=4, m=8), progress=False)
        runs.append(model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(runs[0].qdata, runs[1].qdata) and torch.equal(runs[0].scale, runs[1].scale)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (torch.zeros(0, 16, dtype=torch.long), ValueError, "non-empty LongTensor"),
        (torch.zeros(4, dtype=torch.long), ValueError, "non-empty LongTensor"),
        (torch.zeros(2, 8), TypeError, "token ids"),
    ],
)
def test_bad_calibration_refused_and_model_unchanged(data, error, match):
    model = tiny_llama()
    before = snapshot_state(model)
    with pytest.raises(error, match=match):
        pbs2p.calibrate(model, data, PBS2P(n=4, m=8), progress=False)
    assert snapshot_state(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot_state(model).items())


def test_nan_weight_refused_and_model_unchanged():
    model = tiny_llama()
    model.model.layers[1].self_attn.k_proj.weight.data[0, 0] = float("nan")
    before = snapshot_state(model)
    with pytest.raises(ValueError, match="block 1: self_attn.k_proj"):
        pbs2p.calibrate(model, calibration(vocab=256), PBS2P(n=4, m=8), progress=False)
    after = snapshot_state(model)
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())


def test_each_linear_is_packed_once_and_never_hashed_or_unpacked(monkeypatch):
    """Calibrating packs every linear exactly once; checksums are for save/load, unpacking for inspection."""
    from pbs2p.kernels import packing
    from pbs2p.tensor import binary_sparse_tensor

    counts = {"pack": 0, "unpack": 0, "checksum": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(packing, "pack", counted("pack", packing.pack))
    monkeypatch.setattr(packing, "unpack", counted("unpack", packing.unpack))
    monkeypatch.setattr(binary_sparse_tensor, "content_checksum",
                        counted("checksum", binary_sparse_tensor.content_checksum))
    model = tiny_llama()
    result = pbs2p.calibrate(model, calibration(vocab=256), PBS2P(n=4, m=8), progress=False)
    assert counts == {"pack": len(result.report.converted), "unpack": 0, "checksum": 0}
