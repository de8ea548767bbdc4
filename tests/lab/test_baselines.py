"""Baselines: shapes, N:M structure, honest bits, and sanity of their errors."""

from __future__ import annotations

import pytest
import torch
from helpers import make_layer

from pbs2p.algorithms import relative_output_error
from pbs2p_lab.baselines import binarize_dense, magnitude_nm_sign, pbs2p, sparsegpt_nm
from pbs2p_lab.billm import billm, stbllm

W, H, HE = make_layer(11, out=24, cols=128, dist="student", samples=512)


def _err(W_hat: torch.Tensor) -> float:
    return relative_output_error(W, W_hat, HE)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (6, 8)])
def test_nm_baselines_keep_exactly_n(n, m):
    for r in (magnitude_nm_sign(W, n, m), sparsegpt_nm(W, H, n, m), stbllm(W, H, n, m, max_salient=4),
              pbs2p(W, H, n, m)):
        assert r.W_hat.shape == W.shape
        assert torch.isfinite(r.W_hat).all()
        nz = (r.W_hat != 0).view(24, -1, m).sum(-1)
        assert (nz <= n).all(), r.name  # exactly n kept (a kept weight may dequantize to 0 in rare cases)
        assert r.bits_per_weight > r.paper_bits > 0


def test_magnitude_floor_bits_and_mask():
    r = magnitude_nm_sign(W, 4, 8)
    assert (r.details["mask"].view(r.details["mask"].shape[0], -1, 8).sum(-1) == 4).all()
    assert r.bits_per_weight == pytest.approx((7 + 4) / 8 + 32 / 128)


def test_sparsegpt_is_the_best_pruning_only_reference():
    sgpt = _err(sparsegpt_nm(W, H, 4, 8).W_hat)
    assert sgpt < _err(pbs2p(W, H, 4, 8).W_hat)  # full-precision kept weights
    assert sparsegpt_nm(W, H, 4, 8).bits_per_weight == pytest.approx((7 + 4 * 16) / 8)


def test_billm_reasonable_and_honest_bits():
    r = billm(W, H, max_salient=8, n_candidates=10)
    assert _err(r.W_hat) < _err(magnitude_nm_sign(W, 8 // 2, 8).W_hat)
    assert 1.0 <= r.paper_bits <= 2.0
    assert r.bits_per_weight > r.paper_bits + 1  # group bitmap + 8 scales per row and block


def test_dense_binarization_and_pbs2p_share_the_sweep():
    dense = binarize_dense(W, H)
    assert (dense.W_hat != 0).float().mean() > 0.99
    assert dense.bits_per_weight == pytest.approx(1 + 64 / 128)
    assert _err(dense.W_hat) < 1.0
    r = pbs2p(W, H, 4, 8, spbo_steps=0, compensation="block")
    assert r.name == "pbs2p-oneshot" and r.paper_bits == 0.5


def test_stbllm_uses_activation_norms():
    H2 = H.clone()
    H2[:8, :] *= 100.0
    H2[:, :8] *= 100.0  # inflate the first inputs' norms: STBLLM keeps more of them
    a = (stbllm(W, H, 4, 8, max_salient=0).W_hat[:, :8] != 0).sum()
    b = (stbllm(W, H2, 4, 8, max_salient=0).W_hat[:, :8] != 0).sum()
    assert b >= a
