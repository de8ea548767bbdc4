"""Algorithm tests run single-threaded (small matrices, immune to a busy 2-core machine) and on the method's
torch definition: ``PBS2P_KERNEL=torch`` makes the compensated sweep run its torch group loop, so that these
tests (and the mutation run over ``pbs2p/algorithms``) exercise it. The native group loop
(``pbs2p::sweep_groups``) is held to that loop bit for bit by ``test_native_sweep.py`` in this folder, which
lets the native loop run."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _torch_definition(monkeypatch):
    monkeypatch.setenv("PBS2P_KERNEL", "torch")
