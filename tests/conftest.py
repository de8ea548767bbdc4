"""Shared fixtures: tiny random models and weights (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NM_PATTERNS = [(2, 4), (4, 8), (5, 8), (6, 8)]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random 2-layer LLaMA whose every linear is eligible for 8-groups (hidden 64, FFN 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def mlp(seed: int = 0) -> torch.nn.Module:
    """A random 4-layer MLP; the last linear (in 24) is not a multiple of 16."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 96),
        torch.nn.GELU(),
        torch.nn.Linear(96, 24),
        torch.nn.GELU(),
        torch.nn.Linear(24, 10),
    ).eval()


def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor in the state dict (to check that a refusal changed nothing)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_llama()
