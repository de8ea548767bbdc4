"""Which layers each entry point compresses: the same for the same config, the LM head kept unless asked,
and modules other than ``nn.Linear`` refused by name before anything changes."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot_state, tiny_llama
from torchao.quantization import FqnToConfig
from torchao.quantization import quantize_ as torchao_quantize_
from transformers import AutoModelForCausalLM, TorchAoConfig

import pbs2p
from pbs2p import PBS2P, BinarySparseTensor

TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


def tiny_qwen2() -> torch.nn.Module:
    """A random 2-layer Qwen2 with an untied LM head (q/k/v carry biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def compressed(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, mod in model.named_modules() if isinstance(getattr(mod, "weight", None),
                                                                            BinarySparseTensor))


def decoder_linears(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, mod in model.named_modules()
                  if isinstance(mod, torch.nn.Linear) and ".layers." in name)


def by_quantize_(model, config, tmp_path):
    pbs2p.quantize_(model, config)
    return model


def by_calibrate(model, config, tmp_path):
    pbs2p.calibrate(model, TOKENS, config, cfs=None, tuning=None, progress=False)
    return model


def by_torchao_config(model, config, tmp_path):
    model.save_pretrained(tmp_path / "fp")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=TorchAoConfig(quant_type=config))


ENTRY_POINTS = {"pbs2p.quantize_": by_quantize_, "calibrate": by_calibrate, "TorchAoConfig": by_torchao_config}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_compresses_the_decoder_linears_and_keeps_the_head(tmp_path, family, entry):
    model = FAMILIES[family]()
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: a head that could be converted
    expected = decoder_linears(model)
    assert len(expected) == 14
    done = ENTRY_POINTS[entry](model, PBS2P(n=4, m=8), tmp_path)
    assert compressed(done) == expected
    assert type(done.lm_head.weight) is torch.nn.Parameter
    assert type(done.model.embed_tokens.weight) is torch.nn.Parameter


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_head_is_compressed_when_asked(tmp_path, family):
    model = FAMILIES[family]()
    pbs2p.quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear))
    assert "lm_head" in compressed(model)
    model = FAMILIES[family]()
    model.save_pretrained(tmp_path / "fp")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=TorchAoConfig(quant_type=PBS2P(n=4, m=8), modules_to_not_convert=[]))
    assert "lm_head" in compressed(loaded)


@pytest.mark.parametrize(
    ("pick", "named"),
    [
        ({"model.embed_tokens"}, r"'model.embed_tokens' \(Embedding\)"),
        ({"model.norm", "model.layers.0.mlp.up_proj"}, r"'model.norm' \(LlamaRMSNorm\)"),
    ],
)
def test_pbs2p_quantize_refuses_modules_that_are_not_linears_by_name(pick, named):
    model = tiny_llama()
    before = snapshot_state(model)
    with pytest.raises(ValueError, match=f"nn.Linear weights only; filter_fn selected {named}"):
        pbs2p.quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: name in pick)
    assert compressed(model) == [] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "config",
    [
        FqnToConfig({"model.embed_tokens": PBS2P(n=4, m=8)}),
        FqnToConfig({"model.embed_tokens.weight": PBS2P(n=4, m=8)}),
        FqnToConfig({r"re:model\.embed.*": PBS2P(n=4, m=8)}),
    ],
    ids=["module", "parameter", "regex"],
)
def test_torchao_quantize_refuses_an_embedding_before_changing_it(config):
    model = tiny_llama()
    before = snapshot_state(model)
    with pytest.raises(ValueError, match=r"nn.Linear weights only, not Embedding\(256, 64\), which was left unchanged"):
        torchao_quantize_(model, config, filter_fn=None)
    assert compressed(model) == [] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model(TOKENS)  # still an embedding that works


def test_torchao_quantize_with_a_filter_refuses_a_norm():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"not LlamaRMSNorm\(\(64,\), eps=1e-06\), which was left unchanged"):
        torchao_quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: name == "model.norm")
    assert compressed(model) == []


@pytest.mark.parametrize(
    "quantization_config",
    [
        TorchAoConfig(quant_type=FqnToConfig({"model.embed_tokens": PBS2P(n=4, m=8)})),
        TorchAoConfig(quant_type=FqnToConfig({"_default": PBS2P(n=4, m=8), "re:model\\.embed.*": PBS2P(n=2, m=4)})),
        TorchAoConfig(quant_type=PBS2P(n=4, m=8), include_input_output_embeddings=True),
    ],
    ids=["fqn", "regex", "include-embeddings"],
)
def test_torchao_config_refuses_an_embedding_by_name_before_loading(tmp_path, quantization_config):
    tiny_llama().save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match=r"nn.Linear weights only, but this TorchAoConfig selects "
                                         r"'model.embed_tokens' \(Embedding\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=quantization_config)


def test_torchao_config_mixing_pbs2p_with_other_configs_still_loads(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig

    tiny_llama().save_pretrained(tmp_path / "fp")
    config = FqnToConfig({"_default": PBS2P(n=4, m=8), "lm_head": Int8WeightOnlyConfig(),
                          "model.embed_tokens": None})
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=TorchAoConfig(quant_type=config, modules_to_not_convert=[]))
    assert len(compressed(loaded)) == 14 and type(loaded.lm_head.weight).__name__ != "Parameter"
