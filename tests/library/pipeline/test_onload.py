"""Sequential onloading from a checkpoint folder, copies on a compute device, activation offload, no default device.

Every path must give the packed bits of the plain in-memory run (the unchanged code path) on the same data.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch
from helpers import packed_digest as digest
from helpers import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pbs2p import PBS2P, Checkpoint, calibrate
from pbs2p.pipeline import InMemoryBlocks, SequentialRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tokens(samples: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (samples, 32), generator=torch.Generator().manual_seed(0))


def state_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference():
    """The in-memory run (the code path that existed before onloading) on the tiny LLaMA."""
    model = tiny_llama(0)
    calibrate(model, tokens(), PBS2P(n=4, m=8), progress=False)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_gives_the_in_memory_bits_and_reloads(tmp_path, dtype):
    src = tmp_path / "src"
    tiny_llama(0, dtype).save_pretrained(src)
    before = state_digest(src)
    in_memory = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    calibrate(in_memory, tokens(), PBS2P(n=4, m=8), progress=False)
    result = calibrate(Checkpoint(src, tmp_path / "out"), tokens(), PBS2P(n=4, m=8), progress=False)
    assert result.folder == tmp_path / "out" and state_digest(src) == before  # the source is only read
    names = sorted(p.name for p in result.folder.iterdir())
    assert names == ["config.json", "generation_config.json", "model-00001-of-00003.safetensors",
                     "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                     "model.safetensors.index.json"]
    reloaded = AutoModelForCausalLM.from_pretrained(result.folder).eval()
    assert reloaded.dtype == dtype and digest(reloaded) == digest(in_memory)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, in_memory(tokens()).logits)
    assert [w.device.type for _, w in result.report.converted] == ["meta"] * 14  # shape-only records
    assert result.report.kept_fraction() == 0.5


def test_checkpoint_with_tied_embeddings_and_single_file(tmp_path):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "model.safetensors").is_file()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    calibrate(in_memory, tokens(), PBS2P(n=2, m=4), progress=False)
    calibrate(Checkpoint(tmp_path / "src", tmp_path / "out"), tokens(), PBS2P(n=2, m=4), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, in_memory(tokens()).logits)


def test_checkpoint_refusals_and_failures_write_nothing(tmp_path):
    src = tmp_path / "src"
    tiny_llama(0).save_pretrained(src)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        calibrate(Checkpoint(src, tmp_path / "taken"), tokens(), PBS2P(), progress=False)
    with pytest.raises(ValueError, match="no config.json"):
        calibrate(Checkpoint(tmp_path / "taken", tmp_path / "out"), tokens(), PBS2P(), progress=False)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")  # found when block 1 is read
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="block 1: mlp.up_proj.*nothing was written"):
        calibrate(Checkpoint(src, tmp_path / "out"), tokens(), PBS2P(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "taken"]  # no output, no partial folder


def test_a_copy_on_the_compute_device_gives_the_same_bits_and_restores_on_failure(reference, monkeypatch):
    model = tiny_llama(0)
    result = calibrate(InMemoryBlocks(model, copy=True), tokens(), PBS2P(n=4, m=8), progress=False)
    assert digest(model) == digest(reference) and len(result.report.converted) == 14
    assert model.model.layers[0].self_attn.q_proj.weight.device == model.model.embed_tokens.weight.device

    calibrate_module = importlib.import_module("pbs2p.pipeline.calibrate")
    original, calls = calibrate_module.compress_parts, {"n": 0}

    def fail_in_block_1(*args, **kwargs):  # block 0 was compressed and its weights copied back
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("induced")
        return original(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "compress_parts", fail_in_block_1)
    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="induced"):
        calibrate(InMemoryBlocks(model, copy=True), tokens(), PBS2P(n=4, m=8), progress=False)
    assert calls["n"] == 9
    assert all(type(v) is torch.Tensor and torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("placement", ["cpu", "disk"])
def test_offloaded_activations_give_the_same_bits(reference, placement, monkeypatch):
    from pbs2p.pipeline import sequential

    made = []

    def forced(batch_bytes, n_batches, device):
        made.append(batch_bytes * n_batches)
        return placement

    monkeypatch.setattr(sequential, "choose_placement", forced)
    model = tiny_llama(0)
    calibrate(model, tokens(), PBS2P(n=4, m=8), progress=False)
    assert made == [4 * 32 * 64 * 4] and digest(model) == digest(reference)

    runner = SequentialRunner(tiny_llama(0), tokens(), activations=placement)
    assert runner.hidden.placement == placement and len(runner.hidden) == 1
    folder = runner.hidden.folder
    runner.finish()
    assert folder is None or not folder.path.exists()  # offloaded files are removed


def test_calibrate_uses_no_default_device(reference, tmp_path):
    """With torch's default device set to ``meta``, any tensor made without a device would be empty: the
    run would fail or change its bits. (The host lookup tables of the packing are built first: they are
    built without a device on purpose, see tests/library/test_devices.py.)"""
    from pbs2p.kernels.packing import nm_tables

    for n in range(1, 8):
        nm_tables(n, 8)
    model, ids = tiny_llama(0), tokens()
    tiny_llama(0).save_pretrained(tmp_path / "src")
    with torch.device("meta"):
        calibrate(model, ids, PBS2P(n=4, m=8), progress=False)
        calibrate(Checkpoint(tmp_path / "src", tmp_path / "out"), ids, PBS2P(n=4, m=8), progress=False)
    assert digest(model) == digest(reference)
    assert digest(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) == digest(reference)
