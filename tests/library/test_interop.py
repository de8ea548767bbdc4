"""Hugging Face save/load, safetensors, torchao config round trips, dtypes and devices."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.core.config import config_from_dict, config_to_dict
from torchao.prototype.safetensors import safetensors_utils
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM, TorchAoConfig
from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

import pbs2p
from pbs2p import PBS2P, BinarySparseTensor

TESTS = Path(__file__).parents[1]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def packed_weights(model: torch.nn.Module) -> dict[str, BinarySparseTensor]:
    return {n: p for n, p in model.named_parameters() if isinstance(p, BinarySparseTensor)}


def in_fresh_process(body: str, tmp_path: Path) -> None:
    """Run ``body`` in a new interpreter (after ``import pbs2p``); it prints ``ok`` on success."""
    script = "import os\nos.environ.setdefault('TORCHAO_FORCE_SKIP_LOADING_SO_FILES', '1')\n"
    script += f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport torch, pbs2p\n" + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "ok", result.stdout[-2000:]


def save_reference(model: torch.nn.Module, folder: Path) -> None:
    with torch.no_grad():
        logits = model(IDS).logits
    packed = {
        name: {a: getattr(w, a) for a in ("qdata", "scale", "zero_point")} for name, w in packed_weights(model).items()
    }
    torch.save({"ids": IDS, "logits": logits, "packed": packed}, folder / "reference.pt")


CHECK_RELOAD = """
from transformers import AutoModelForCausalLM
ref = torch.load("reference.pt", weights_only=True)
model = AutoModelForCausalLM.from_pretrained("{folder}")
packed = {{n: p for n, p in model.named_parameters() if isinstance(p, pbs2p.BinarySparseTensor)}}
assert sorted(packed) == sorted(ref["packed"]), (sorted(packed), sorted(ref["packed"]))
for name, parts in ref["packed"].items():
    for attr, value in parts.items():
        assert torch.equal(getattr(packed[name], attr), value), (name, attr)
with torch.no_grad():
    assert torch.equal(model(ref["ids"]).logits, ref["logits"])
print("ok")
"""


def test_save_pretrained_round_trip_in_fresh_process(tmp_path):
    model = tiny_llama()
    pbs2p.calibrate(model, torch.randint(0, 256, (2, 32)), PBS2P(n=4, m=8), progress=False)
    model.save_pretrained(tmp_path / "ckpt")
    save_reference(model, tmp_path)
    in_fresh_process(CHECK_RELOAD.format(folder=tmp_path / "ckpt"), tmp_path)


def test_quantize_on_load_then_round_trip(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    config = TorchAoConfig(quant_type=PBS2P(n=2, m=4))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    packed = packed_weights(model)
    assert len(packed) == 14 and all(w.nm() == (2, 4) for w in packed.values())
    same = copy.deepcopy(tiny_llama())
    quantize_(same, PBS2P(n=2, m=4), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name != "lm_head")
    for name, w in packed_weights(same).items():
        assert torch.equal(w.qdata, packed[name].qdata), name
    model.save_pretrained(tmp_path / "q")
    save_reference(model, tmp_path)
    in_fresh_process(CHECK_RELOAD.format(folder=tmp_path / "q"), tmp_path)


def test_tied_lm_head_is_left_tied_and_the_checkpoint_reloads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = pbs2p.quantize_(model, PBS2P(n=4, m=8))
    assert [name for name, _ in report.skipped] == ["lm_head"]
    assert "tied" in dict(report.skipped)["lm_head"]
    assert len(report.converted) == 7 and model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    save_reference(model, tmp_path)
    in_fresh_process(CHECK_RELOAD.format(folder=tmp_path / "tied"), tmp_path)


def test_safetensors_holds_the_packed_bytes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(cfg).eval()
    fp32_bytes = sum(m.weight.numel() * 4 for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    pbs2p.quantize_(
        model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and ".layers." in name
    )
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys() if ".layers." in k and "._weight_" in k)  # noqa: SIM118 (safe_open is no dict)
    assert stored == sum(w.packed_nbytes() for w in packed_weights(model).values())
    assert stored * 16 <= fp32_bytes


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model = tiny_llama()
    model = AutoModelForCausalLM.from_config(model.config)
    model.load_state_dict(tiny_llama().state_dict())
    pbs2p.quantize_(
        model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name != "lm_head"
    )
    model.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def rewrite(src: Path, dst: Path, mutate_tensors=None, mutate_metadata=None) -> Path:
    shutil.copytree(src, dst)
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118 (safe_open is no dict)
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_metadata:
        mutate_metadata(metadata)
    save_file(tensors, dst / "model.safetensors", metadata=metadata)
    return dst


KEY = "model.layers.0.self_attn.q_proj"


def _drop_all(t):
    for k in [k for k in t if k.startswith(KEY)]:
        del t[k]


def _bump_version(md):
    entry = json.loads(md[f"{KEY}.weight"])
    entry["_data"]["format_version"] = 2
    md[f"{KEY}.weight"] = json.dumps(entry)


def _flip_a_bit(t):
    qdata = t[f"{KEY}._weight_qdata"].clone()
    qdata.view(-1)[17] ^= 4
    t[f"{KEY}._weight_qdata"] = qdata


def _change_n(md):
    entry = json.loads(md[f"{KEY}.weight"])
    entry["_data"]["n"] = 5
    md[f"{KEY}.weight"] = json.dumps(entry)


@pytest.mark.parametrize(
    ("tensors", "metadata", "match"),
    [
        (lambda t: t.__setitem__(f"{KEY}._weight_qdata", t[f"{KEY}._weight_qdata"][:, :3]), None, "checksum"),
        (lambda t: t.pop(f"{KEY}._weight_zero_point"), None, "TorchAoDeserialize"),
        (_drop_all, None, "is not in the checkpoint"),
        (None, _bump_version, "format version"),
        (None, _change_n, "does not match its checksum"),
        (_flip_a_bit, None, "does not match its checksum"),
    ],
    ids=["truncated-qdata", "missing-zero-point", "missing-weight", "format-version", "tampered-n", "flipped-bit"],
)
def test_damaged_checkpoints_are_refused(checkpoint, tmp_path, caplog, capfd, tensors, metadata, match):
    bad = rewrite(checkpoint, tmp_path / "bad", tensors, metadata)
    with pytest.raises((ValueError, RuntimeError)) as info:
        AutoModelForCausalLM.from_pretrained(bad)
    # transformers re-raises conversion errors generically, after printing the reason in its load report
    assert match in f"{info.value} {caplog.text} {capfd.readouterr().err}"


def test_truncated_file_is_refused(checkpoint, tmp_path):
    bad = tmp_path / "cut"
    shutil.copytree(checkpoint, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)incomplete|truncat|header|invalid|error"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_config_dict_round_trip():
    config = PBS2P(n=5, m=8, scale_block=64, spbo_steps=0, extras=["refit"])
    data = config_to_dict(config)
    assert json.loads(json.dumps(data)) == data
    assert config_from_dict(data) == config


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_lower_precision_matches_fp32(dtype, tol):
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8))
    with torch.no_grad():
        ref = model(IDS).logits
        low = copy.deepcopy(model).to(dtype)
        assert all(w.dtype == dtype for w in packed_weights(low).values())
        out = low(IDS).logits
    assert out.dtype == dtype
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < tol, float(rel)


def test_meta_device_and_back():
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8))
    meta = copy.deepcopy(model).to("meta")
    w = meta.model.layers[0].mlp.up_proj.weight
    assert isinstance(w, BinarySparseTensor) and w.device.type == "meta" and w.qdata.device.type == "meta"
    with torch.device("meta"):
        skeleton = tiny_llama()
    report = pbs2p.conversion_report(skeleton)
    reasons = dict(report.skipped)
    assert reasons.pop("lm_head").startswith("the LM head")
    assert reasons and all(reason.startswith("weight is on the meta device") for reason in reasons.values())


def test_library_hooks_are_in_place():
    # fails loudly if a torchao / transformers release moves what pbs2p registers into
    assert safetensors_utils.ALLOWED_CLASSES["BinarySparseTensor"] is BinarySparseTensor
    assert "BinarySparseTensor" in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES
    assert TorchAoHfQuantizer._pbs2p_verifies
    from transformers import modeling_utils

    # the loader and saver hooks: checkpoint files checked before loading, load reports after, digests written
    assert modeling_utils.PreTrainedModel._load_pretrained_model._pbs2p_checks
    assert modeling_utils.PreTrainedModel._finalize_model_loading._pbs2p_checks
    assert TorchAoHfQuantizer.get_state_dict_and_metadata._pbs2p_checks
    assert modeling_utils.safe_save_file._pbs2p_checks
    assert modeling_utils.PreTrainedModel.save_pretrained._pbs2p_checks  # torchao-converted models marked first
    assert BinarySparseTensor.tensor_data_names == ["qdata", "scale", "zero_point"]
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer as Q

    suffixes = Q.serialized_names.fget  # transformers must still look up the torchao inner names
    assert suffixes is not None


def test_torchao_quantize_then_save_pretrained_round_trip(tmp_path):
    """torchao's own quantize_ on a transformers model, then save_pretrained: written, and reloaded as it was."""
    model = tiny_llama()
    config = PBS2P(n=4, m=8, refine_rounds=1)
    quantize_(model, config)  # torchao's: converts what its filter_fn selects, the LM head included
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config_from_dict(saved["quant_type"]["default"]) == config
    save_reference(model, tmp_path)
    in_fresh_process(CHECK_RELOAD.format(folder=tmp_path / "ckpt"), tmp_path)


def _mixed_nm(model):
    quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: name.endswith("q_proj"))
    quantize_(model, PBS2P(n=2, m=4), filter_fn=lambda mod, name: name.endswith("k_proj"))


def _by_hand(model):
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(
        pbs2p.compress_weight(model.model.layers[0].mlp.up_proj.weight, PBS2P(n=4, m=8)), requires_grad=False)


def _replaced_by_hand(model):
    quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: name.endswith("up_proj"))
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(  # recorded 4:8, now 2:4
        pbs2p.compress_weight(torch.randn(128, 64), PBS2P(n=2, m=4)), requires_grad=False)


def _with_int8(model):
    from torchao.quantization import Int8WeightOnlyConfig

    quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: name.endswith("q_proj"))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda mod, name: name == "lm_head")


@pytest.mark.parametrize(
    ("convert", "match"),
    [
        (_mixed_nm, r"2 different PBS2P configs \(model.layers.0.self_attn.q_proj.weight: PBS2P\(n=4, m=8"),
        (_by_hand, "model.layers.0.mlp.up_proj.weight holds a BinarySparseTensor that no PBS2P conversion recorded"),
        (_replaced_by_hand, "model.layers.0.mlp.up_proj.weight holds a BinarySparseTensor that no PBS2P conversion "
                            "recorded"),
        (_with_int8, r"other torchao tensors \(lm_head.weight \(Int8Tensor\)\)"),
    ],
    ids=["two-configs", "assigned-by-hand", "replaced-by-hand", "with-int8"],
)
def test_save_pretrained_refuses_what_config_json_cannot_record(tmp_path, convert, match):
    model = tiny_llama()
    convert(model)
    before = {k: id(v) for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert {k: id(v) for k, v in model.named_parameters()} == before


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_from_pretrained_dtype_reaches_the_packed_scales(tmp_path, dtype, tol):
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=dtype)
    packed, reference = packed_weights(loaded), packed_weights(model)
    assert len(packed) == 14
    for name, w in packed.items():
        assert w.dtype == w.scale.dtype == w.zero_point.dtype == dtype, name
        assert torch.equal(w.scale, reference[name].scale.to(dtype)) and torch.equal(w.qdata, reference[name].qdata)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    with torch.no_grad():
        ref, out = model(IDS).logits, loaded(IDS).logits
    assert out.dtype == dtype and (out.float() - ref).norm() / ref.norm() < tol
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # the dtype it was saved in: untouched
    assert all(w.scale.dtype == torch.float32 for w in packed_weights(again).values())


def test_a_low_precision_checkpoint_loads_in_float32(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    pbs2p.quantize_(model, PBS2P(n=4, m=8))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
