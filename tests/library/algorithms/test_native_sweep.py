"""The native group loop of the compensated sweep (``pbs2p::sweep_groups``) gives the torch loop's bits exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pbs2p.algorithms import method
from pbs2p.kernels import native

NM = [(1, 4), (2, 4), (3, 4), (3, 8), (4, 8), (6, 8), (7, 8), (5, 16)]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native operator cannot be built here")
    assert native.load(), "the native operator failed to build"


@pytest.fixture(autouse=True)
def _native_definition(monkeypatch) -> None:  # this folder's conftest selects the torch loop; these tests compare
    monkeypatch.delenv("PBS2P_KERNEL", raising=False)


def torch_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(method, "sweep_op", lambda W: None)


def layer(seed: int, out: int, cols: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g)
    X[:, 1] = 0.0  # a dead input
    if ties:  # equal weights and equal input statistics: equal scores inside groups
        W[:, 2::4] = W[:, 3::4] = 0.5
        X[:, 3] = X[:, 2]
        W[: out // 2] = 0.0
    return W, 2 * X.T @ X / X.shape[0]


@settings(max_examples=60, deadline=None)
@given(
    nm=st.sampled_from(NM),
    out=st.integers(1, 40),
    groups=st.integers(1, 40),
    compensation=st.sampled_from(method.COMPENSATIONS),
    steps=st.sampled_from([None, 0, 1]),
    ties=st.booleans(),
    block_size=st.sampled_from([8, 32, 128]),
    seed=st.integers(0, 2**16),
)
def test_native_loop_gives_the_torch_loops_bits(nm, out, groups, compensation, steps, ties, block_size, seed):
    n, m = nm
    W, H = layer(seed, out, groups * m, ties)
    kw = dict(spbo_steps=steps, compensation=compensation, block_size=block_size)
    assert method.sweep_op(W) is not None  # the native loop runs below
    fast = method.compress(W, H, n, m, **kw)
    with pytest.MonkeyPatch.context() as mp:
        torch_loop(mp)
        slow = method.compress(W, H, n, m, **kw)
    for field in ("mask", "signs", "alpha", "mu"):
        assert torch.equal(getattr(fast, field), getattr(slow, field)), field


def test_one_sweep_is_the_same_to_the_last_bit_with_prior_pruning():
    W, H = layer(3, 33, 96, ties=False)
    prep = method.prepare_hessian(H)
    pruned = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) < 0.25
    pruned.view(33, -1, 8)[..., :4] = False  # every group keeps at least its first four candidates
    levels = (W.abs().mean(1, keepdim=True), 0.1 * W.mean(1, keepdim=True))
    kw = dict(levels=levels, scale_block=96, pruned=pruned, oneshot=False, compensation="column", block_size=32)
    fast = method.sweep(W, prep, 3, 8, **kw)
    with pytest.MonkeyPatch.context() as mp:
        torch_loop(mp)
        slow = method.sweep(W, prep, 3, 8, **kw)
    assert all(torch.equal(a, b) for a, b in zip(fast[:3], slow[:3], strict=True)) and fast[3] == slow[3]
    assert not (fast[0] & pruned).any()


def test_the_native_loop_is_used_only_where_it_applies(monkeypatch):
    cpu = torch.zeros(2, 8)
    assert native.sweep_op(cpu) is not None
    assert native.sweep_op(cpu.double()) is None
    assert native.sweep_op(torch.zeros(2, 8, device="meta")) is None
    monkeypatch.setenv("PBS2P_KERNEL", "torch")
    assert native.sweep_op(cpu) is None


def test_refuses_what_it_cannot_compute():
    z = torch.zeros(8, 4)
    args = [z.clone(), torch.zeros(8, 4, dtype=torch.bool), z.clone(), z, z, z, z, torch.ones(8), torch.eye(8),
            torch.ones(8)]
    with pytest.raises(RuntimeError, match="whole groups"):
        torch.ops.pbs2p.sweep_groups(*args, 0, 2, 3, False, True)
    with pytest.raises(RuntimeError, match="outside the weight"):
        torch.ops.pbs2p.sweep_groups(*args, 4, 2, 4, False, True)
    args[0] = z.double()
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        torch.ops.pbs2p.sweep_groups(*args, 0, 2, 4, False, True)
