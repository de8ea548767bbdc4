"""Damaged and incomplete PBS²P checkpoints: every one is refused by a load in a fresh process, naming the tensor.

One checkpoint of a tiny LLaMA is written, then copied with one damage each (every packed weight loses each
of its tensors, its whole entry, its checksum; the config loses its ``quantization_config``, says another
N:M, gains layers; ...). A new interpreter that only did ``import pbs2p`` loads them all with
``from_pretrained``; each load must raise and name what is wrong, and the intact copy must load exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file

import pbs2p
from pbs2p import PBS2P

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARTS = ("qdata", "scale", "zero_point")
TINY_PACKED = [f"model.layers.{i}.{name}.weight" for i in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _flat(weight: str, part: str) -> str:
    module, name = weight.rsplit(".", 1)
    return f"{module}._{name}_{part}"


Damage = Callable[[dict, dict, dict], None]  # (tensors, metadata, config.json) -> None, in place


def _drop_part(weight: str, part: str) -> Damage:
    def damage(tensors, metadata, config):
        del tensors[_flat(weight, part)]
    return damage


def _drop_weight(weight: str) -> Damage:
    def damage(tensors, metadata, config):
        for part in PARTS:
            del tensors[_flat(weight, part)]
        del metadata[weight]
        metadata["tensor_names"] = json.dumps([n for n in json.loads(metadata["tensor_names"]) if n != weight])
    return damage


def _drop_checksum(weight: str) -> Damage:
    def damage(tensors, metadata, config):
        entry = json.loads(metadata[weight])
        entry["_data"].pop("checksum", None)
        metadata[weight] = json.dumps(entry)
    return damage


def _drop_plain(key: str) -> Damage:
    def damage(tensors, metadata, config):
        del tensors[key]
        del metadata[key]
        metadata["tensor_names"] = json.dumps([n for n in json.loads(metadata["tensor_names"]) if n != key])
    return damage


def _config(**changes) -> Damage:
    def damage(tensors, metadata, config):
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            elif key == "nm":
                data = config["quantization_config"]["quant_type"]["default"]["_data"]
                data["n"], data["m"] = value
            else:
                config[key] = value
    return damage


def _strip_metadata(tensors, metadata, config):
    metadata.clear()


def _change_value(key: str) -> Damage:
    def damage(tensors, metadata, config):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] += 0.5
    return damage


def _flip_bits(key: str) -> Damage:
    def damage(tensors, metadata, config):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] ^= 0x10
    return damage


def _drop_tensor_checksums(tensors, metadata, config):
    metadata.pop("pbs2p_tensor_checksums", None)


def _add_tensor(tensors, metadata, config):
    tensors["model.extra.weight"] = torch.zeros(4)


def _rename_in_tensor_names(key: str, new: str) -> Damage:
    def damage(tensors, metadata, config):
        metadata["tensor_names"] = json.dumps([new if n == key else n for n in json.loads(metadata["tensor_names"])])
    return damage


#: case id -> (damage, a string the refusal must contain)
CASES: dict[str, tuple[Damage, str]] = {}
for _w in TINY_PACKED:
    for _p in PARTS:
        CASES[f"missing-{_p}-{_w}"] = (_drop_part(_w, _p), _w)
    CASES[f"missing-weight-and-entry-{_w}"] = (_drop_weight(_w), _w)
    CASES[f"missing-checksum-{_w}"] = (_drop_checksum(_w), _w)
CASES.update({
    "no-quantization-config": (_config(quantization_config=None), "model.layers.0."),
    "config-says-2of4": (_config(nm=(2, 4)), "quantization_config says 2:4"),
    "config-says-5of8": (_config(nm=(5, 8)), "quantization_config says 5:8"),
    "config-says-4of16": (_config(nm=(4, 16)), "quantization_config says 4:16"),
    "more-layers-in-config": (_config(num_hidden_layers=3), "model.layers.2."),
    "fewer-layers-in-config": (_config(num_hidden_layers=1), "model.layers.1."),
    "missing-embed-tokens": (_drop_plain("model.embed_tokens.weight"), "model.embed_tokens.weight"),
    "missing-lm-head": (_drop_plain("lm_head.weight"), "lm_head.weight"),
    "missing-final-norm": (_drop_plain("model.norm.weight"), "model.norm.weight"),
    "missing-layernorm": (_drop_plain("model.layers.1.input_layernorm.weight"), "model.layers.1.input_layernorm"),
    "metadata-stripped": (_strip_metadata, "describes no packed weight"),
    # bytes of tensors that have no checksum of their own (embeddings, norms, the LM head) and of packed ones
    "embedding-value-changed": (_change_value("model.embed_tokens.weight"),
                                "model.embed_tokens.weight (in model.safetensors) does not match its checksum"),
    "final-norm-value-changed": (_change_value("model.norm.weight"), "model.norm.weight (in model.safetensors)"),
    "lm-head-value-changed": (_change_value("lm_head.weight"), "lm_head.weight (in model.safetensors)"),
    "packed-scale-value-changed": (_change_value(_flat(TINY_PACKED[3], "scale")), _flat(TINY_PACKED[3], "scale")),
    "packed-codes-bits-flipped": (_flip_bits(_flat(TINY_PACKED[9], "qdata")), _flat(TINY_PACKED[9], "qdata")),
    "tensor-checksums-removed": (_drop_tensor_checksums, "has no valid pbs2p_tensor_checksums"),
    "tensor-added": (_add_tensor, "model.extra.weight (in model.safetensors) has no recorded checksum"),
    # one byte of a name in the metadata's tensor_names (was transformers' "Invalid torchao safetensors metadata")
    "tensor-names-packed-name-changed": (
        _rename_in_tensor_names(TINY_PACKED[13], TINY_PACKED[13][:-2] + "jt"),
        f"{TINY_PACKED[13][:-2]}jt is listed in the metadata's tensor_names, but no file's metadata describes it"),
    "tensor-names-plain-name-changed": (
        _rename_in_tensor_names("model.norm.weight", "model.norm.weigjt"),
        "model.norm.weigjt is listed in the metadata's tensor_names, but no file's metadata describes it"),
})


def write_damaged(good: Path, dst: Path, damage: Damage) -> Path:
    shutil.copytree(good, dst)
    with safe_open(good / "model.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    config = json.loads((good / "config.json").read_text())
    damage(tensors, metadata, config)
    save_file(tensors, dst / "model.safetensors", metadata=metadata or None)
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return dst


LOADER = """
import json, os, sys
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
import torch, pbs2p
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_error()
torch.set_num_threads(1)
root = sys.argv[1]
out = {}
for name in sorted(os.listdir(root)):
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(root, name))
        with torch.no_grad():
            logits = model(torch.arange(12).reshape(1, 12)).logits
        out[name] = {"loaded": True, "logits": logits.flatten()[:64].tolist()}
    except Exception as exc:
        out[name] = {"loaded": False, "type": type(exc).__name__, "message": str(exc)[:3000]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loads(tmp_path_factory) -> dict[str, dict]:
    """Load every damaged copy (and the intact one, as ``intact``) in one fresh process; what each load did."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8),
                    filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name != "lm_head")
    good = root / "good"
    model.save_pretrained(good)
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(1, 12)).logits.flatten()[:64].tolist()
    cases = root / "cases"
    cases.mkdir()
    shutil.copytree(good, cases / "intact")
    for case, (damage, _) in CASES.items():
        write_damaged(good, cases / case, damage)
    before = {p.relative_to(cases): p.read_bytes() for p in sorted(cases.rglob("*")) if p.is_file()}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LOADER), str(cases)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    after = {p.relative_to(cases): p.read_bytes() for p in sorted(cases.rglob("*")) if p.is_file()}
    assert after == before, "a refused load changed the files"
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    outcome["intact"]["expected_logits"] = logits
    return outcome


def test_the_intact_checkpoint_loads_exactly(loads):
    intact = loads["intact"]
    assert intact["loaded"], intact
    assert intact["logits"] == intact["expected_logits"]


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_is_refused_naming_the_cause(loads, case):
    outcome, needle = loads[case], CASES[case][1]
    assert not outcome["loaded"], f"{case}: loaded without an error"
    assert needle in outcome["message"], f"{case}: {outcome['type']}: {outcome['message'][:600]}"
    print(f"{case}: {outcome['type']}: {outcome['message'][:500]}")
