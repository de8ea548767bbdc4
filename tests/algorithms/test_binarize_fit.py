"""Binarizer: closed form + ARB refinement over a kept set (pbs2p.algorithms.binarize)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from pbs2p.algorithms.binarize import binarize, fit_binary, fit_values
from pbs2p.algorithms.binarized import dequantize_parts


def _rand(seed: int, out: int, cols: int, heavy: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) + torch.randn(out, 1, generator=g)  # nonzero row means
    if heavy:
        W = W * torch.randn(out, cols, generator=g).abs().pow(2)
    return W


@given(seed=st.integers(0, 10_000), out=st.integers(1, 6), cols=st.integers(1, 40),
       sb=st.integers(1, 48), rounds=st.integers(0, 6), density=st.floats(0.0, 1.0), heavy=st.booleans())
def test_fit_error_bounded_and_alpha_nonnegative(seed, out, cols, sb, rounds, density, heavy):
    W = _rand(seed, out, cols, heavy)
    mask = torch.rand(out, cols, generator=torch.Generator().manual_seed(seed + 1)) < density
    signs, alpha, mu = fit_binary(W, mask, sb, rounds=rounds)
    sb_eff = min(sb, cols)
    W_hat = dequantize_parts(mask, signs, alpha, mu, sb_eff)
    assert (alpha >= 0).all()
    assert not (signs & ~mask).any()
    assert alpha.shape == mu.shape == (out, -(-cols // sb_eff))
    assert torch.linalg.norm(W - W_hat) <= torch.linalg.norm(W) * (1 + 1e-5) + 1e-6
    assert (W_hat[~mask] == 0).all()


@given(seed=st.integers(0, 10_000), heavy=st.booleans(), weighted=st.booleans())
def test_refinement_never_increases_error(seed, heavy, weighted):
    W = _rand(seed, 8, 48, heavy)
    mask = torch.rand(8, 48, generator=torch.Generator().manual_seed(seed)) < 0.6
    v = torch.rand(48, generator=torch.Generator().manual_seed(seed + 7)) + 0.05 if weighted else None
    prev = None
    for rounds in range(0, 6):
        signs, alpha, mu = fit_binary(W, mask, 16, rounds=rounds, col_weight=v)
        E = (W - dequantize_parts(mask, signs, alpha, mu, 16)).square()
        err = float((E * (1 if v is None else v)).sum())
        if prev is not None:
            assert err <= prev * (1 + 1e-5) + 1e-7
        prev = err


def test_compact_and_masked_paths_agree():
    W = _rand(3, 16, 64, False)
    full = torch.ones(16, 64, dtype=torch.bool)
    a = fit_binary(W, full, 32, rounds=3)  # dense fast path
    pos, alpha, mu = fit_values(W.reshape(16, 2, 32), torch.ones(1, 2, 32), rounds=3)  # weighted path
    assert torch.equal(a[0], pos.reshape(16, 64))
    torch.testing.assert_close(a[1], alpha)
    torch.testing.assert_close(a[2], mu)


def test_closed_form_on_symmetric_row():
    W = torch.tensor([[-2.0, -1.0, 1.0, 2.0]])
    signs, alpha, mu = fit_binary(W, torch.ones_like(W, dtype=torch.bool), 4, rounds=0)
    assert signs.tolist() == [[False, False, True, True]]
    torch.testing.assert_close(alpha, torch.tensor([[1.5]]))
    torch.testing.assert_close(mu, torch.tensor([[0.0]]))


def test_binarize_dense_lowers_error_vs_sign_only():
    W = _rand(5, 32, 64, True)
    W_hat = binarize(W)
    sign_only = W.abs().mean(1, keepdim=True) * W.sign()
    assert torch.linalg.norm(W - W_hat) <= torch.linalg.norm(W - sign_only)
