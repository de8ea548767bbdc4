"""compress_weight: the contract the rest of the library builds on."""

from __future__ import annotations

import pytest
import torch
from alg_helpers import make_layer
from hypothesis import given
from hypothesis import strategies as st

from pbs2p.algorithms import BinarizedWeight, compress_weight, honest_bits_per_weight
from pbs2p.algorithms.binarized import expand_blocks
from pbs2p.algorithms.metrics import output_error_sq

NM = [(n, m) for m in (4, 8, 16) for n in range(1, m)]


def _check(bw: BinarizedWeight, W: torch.Tensor, n: int, m: int) -> None:
    out, cols = W.shape
    assert bw.mask.dtype == torch.bool and bw.signs.dtype == torch.bool
    assert bw.mask.shape == bw.signs.shape == W.shape
    assert (bw.mask.view(out, cols // m, m).sum(-1) == n).all()
    assert not (bw.signs & ~bw.mask).any()
    nb = -(-cols // bw.scale_block)
    assert bw.alpha.shape == bw.mu.shape == (out, nb)
    assert bw.alpha.dtype == bw.mu.dtype == torch.float32
    assert (bw.alpha >= 0).all()
    a = expand_blocks(bw.alpha, bw.scale_block, cols)
    u = expand_blocks(bw.mu, bw.scale_block, cols)
    expect = bw.mask * (a * (2 * bw.signs.float() - 1) + u)
    torch.testing.assert_close(bw.dequantize(), expect)


@given(seed=st.integers(0, 10_000), nm=st.sampled_from(NM), groups=st.integers(1, 5), out=st.integers(1, 9),
       sb=st.sampled_from([None, 1, 8, 12, 16, 1000]), method=st.sampled_from(["spbo", "oneshot"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_data_free_contract(seed, nm, groups, out, sb, method, dtype):
    n, m = nm
    W = torch.randn(out, groups * m, generator=torch.Generator().manual_seed(seed)).to(dtype)
    bw = compress_weight(W, None, n=n, m=m, scale_block=sb, method=method)
    _check(bw, W, n, m)
    Wf = W.float()
    assert torch.linalg.norm(Wf - bw.dequantize()) <= torch.linalg.norm(Wf) * (1 + 1e-5)


@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(2, 4), (4, 8), (6, 8), (1, 8), (8, 16)]),
       sb=st.sampled_from([None, 16, 24]), comp=st.sampled_from(["column", "block", "block-diag", "none"]),
       method=st.sampled_from(["spbo", "oneshot"]), block=st.sampled_from([16, 32, 128]))
def test_calibrated_contract_and_output_bound(seed, nm, sb, comp, method, block):
    n, m = nm
    W, H, _ = make_layer(seed, out=8, cols=48, samples=128)
    bw = compress_weight(W, H, n=n, m=m, scale_block=sb, compensation=comp, method=method, block_size=block)
    _check(bw, W, n, m)
    # the final least-squares refit makes Ŵ no worse than 0 on the calibration data
    assert output_error_sq(W, bw.dequantize(), H) <= output_error_sq(W, torch.zeros_like(W), H) * (1 + 1e-4)


def test_deterministic_bit_identical():
    W, H, _ = make_layer(0, out=16, cols=64)
    for h in (None, H):
        a = compress_weight(W, h, n=4, m=8)
        b = compress_weight(W.clone(), None if h is None else h.clone(), n=4, m=8)
        for x, y in zip((a.mask, a.signs, a.alpha, a.mu), (b.mask, b.signs, b.alpha, b.mu), strict=True):
            assert torch.equal(x, y)


def test_bits_accounting():
    bw = compress_weight(torch.randn(4, 576), None, n=4, m=8)
    assert bw.bits_per_weight() == pytest.approx(11 / 8 + 64 / 576)
    assert bw.bits_per_weight() <= 1.5
    assert honest_bits_per_weight(2, 4, 576) == pytest.approx(5 / 4 + 64 / 576)
    assert honest_bits_per_weight(4, 8, 576, 128, scale_bits=16) == pytest.approx(11 / 8 + 5 * 32 / 576)
    assert honest_bits_per_weight(4, 8, 576, mask_format="bitmap") == pytest.approx(12 / 8 + 64 / 576)


@pytest.mark.parametrize(
    ("W", "H", "kw", "match"),
    [
        (torch.randn(4, 12), None, dict(n=4, m=8), "multiple of m"),
        (torch.randn(4, 16), None, dict(n=8, m=8), "n < m"),
        (torch.randn(4, 16), None, dict(n=0, m=8), "1 <= n"),
        (torch.randn(16), None, dict(n=4, m=8), "2-D"),
        (torch.randint(0, 3, (4, 16)), None, dict(n=4, m=8), "floating-point"),
        (torch.tensor([[float("nan")] * 8]), None, dict(n=4, m=8), "NaN or Inf"),
        (torch.tensor([[float("inf")] * 8]), None, dict(n=4, m=8), "NaN or Inf"),
        (torch.randn(4, 16), torch.eye(8), dict(n=4, m=8), "in_features=16"),
        (torch.randn(4, 16), torch.ones(16, 15), dict(n=4, m=8), "square"),
        (torch.randn(4, 16), torch.full((16, 16), float("nan")), dict(n=4, m=8), "H contains NaN"),
        (torch.randn(4, 16), torch.eye(16, dtype=torch.int64), dict(n=4, m=8), "floating-point"),
        (torch.randn(4, 16), None, dict(n=4, m=8, scale_block=0), "scale_block"),
        (torch.randn(4, 16), None, dict(n=4, m=8, method="magic"), "method"),
        (torch.randn(4, 16), torch.eye(16), dict(n=4, m=8, compensation="magic"), "compensation"),
    ],
)
def test_input_validation(W, H, kw, match):
    with pytest.raises(ValueError, match=match):
        compress_weight(W, H, **kw)


def test_dead_inputs_do_not_break_calibration():
    W, H, _ = make_layer(3, out=8, cols=32)
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    bw = compress_weight(W, H, n=2, m=4)
    _check(bw, W, 2, 4)
    assert torch.isfinite(bw.alpha).all() and torch.isfinite(bw.mu).all()


def test_rank_deficient_hessian():
    W = torch.randn(8, 64)
    X = torch.randn(10, 64)  # 10 samples for 64 inputs
    bw = compress_weight(W, 2 * X.T @ X / 10, n=4, m=8, damp=0.0)
    _check(bw, W, 4, 8)
