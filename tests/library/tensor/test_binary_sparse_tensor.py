"""BinarySparseTensor: construction, ops, dtype/device moves, honest bit counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import NM_PATTERNS
from hypothesis import given
from hypothesis import strategies as st

from pbs2p import PBS2P, BinarySparseTensor, compress_weight
from pbs2p.kernels import packing


def weight(out: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(out, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@given(
    nm=st.sampled_from(NM_PATTERNS),
    out=st.integers(1, 130),
    groups=st.integers(1, 12),
    seed=st.integers(0, 999),
)
def test_compress_weight_properties(nm, out, groups, seed):
    n, m = nm
    w = weight(out, groups * m, seed)
    q = compress_weight(w, PBS2P(n=n, m=m))
    w_hat = q.dequantize()
    assert q.shape == w.shape and q.dtype == w.dtype and q.nm() == (n, m)
    kept = (w_hat != 0).reshape(out, groups, m).sum(-1)
    assert (kept <= n).all()  # a kept weight can only dequantize to 0 if alpha*sign + mu == 0
    mask, _ = q.unpack()
    assert (mask.reshape(out, groups, m).sum(-1) == n).all()
    assert (q.alpha >= 0).all()
    assert torch.linalg.norm(w - w_hat) <= torch.linalg.norm(w)


@given(nm=st.sampled_from(NM_PATTERNS), seed=st.integers(0, 999))
def test_same_seed_same_bits(nm, seed):
    n, m = nm
    w = weight(70, 8 * m, seed)
    a, b = compress_weight(w, PBS2P(n=n, m=m)), compress_weight(w.clone(), PBS2P(n=n, m=m))
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize(("n", "m"), [(4, 8), (2, 4)])
def test_bits_per_weight_at_4096(n, m):
    q = compress_weight(weight(256, 4096), PBS2P(n=n, m=m))
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in (q.qdata, q.alpha, q.mu))
    assert q.bits_per_weight() == stored_bits / (256 * 4096)
    assert q.bits_per_weight() <= 1.6


def test_bits_per_weight_counts_tile_padding():
    q = compress_weight(weight(65, 64), PBS2P(n=4, m=8))  # 65 rows are stored as 128
    assert q.qdata.shape[0] == 2
    assert q.bits_per_weight() > 2 * 1.375


def test_from_parts_round_trip():
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :4] = True
    signs = mask & torch.tensor([True, False, True, False, False, False, False, False])
    q = BinarySparseTensor.from_parts(mask, signs, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), n=4, m=8)
    expected = torch.tensor([1.0, -1.0, 1.0, -1.0, 0, 0, 0, 0]) * torch.tensor([[1.0], [2.0], [3.0]])
    assert torch.equal(q.dequantize(), expected)


def test_from_parts_rejects_bad_scales():
    mask = torch.ones(3, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="alpha and mu must be"):
        BinarySparseTensor.from_parts(mask, mask, torch.ones(2), torch.ones(2), n=4, m=8)


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 5)])
def test_linear_matches_dequantized(batch):
    w = compress_weight(weight(96, 128), PBS2P(n=4, m=8))
    x = torch.randn(*batch, 128)
    bias = torch.randn(96)
    torch.testing.assert_close(F.linear(x, w, bias), F.linear(x, w.dequantize(), bias), rtol=1e-5, atol=1e-5)


def test_per_block_scales():
    w = weight(64, 256)
    q = compress_weight(w, PBS2P(n=4, m=8, scale_block=64))
    assert q.alpha.shape == (64, 4) and q.scale_block == 64
    x = torch.randn(4, 256)
    torch.testing.assert_close(F.linear(x, q), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)


def test_to_dtype_switches_compute():
    q = compress_weight(weight(64, 64), PBS2P(n=4, m=8))
    b = q.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.alpha.dtype == torch.bfloat16 and torch.equal(b.qdata, q.qdata)
    assert F.linear(torch.randn(2, 64, dtype=torch.bfloat16), b).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="cannot become torch.int8"):
        q.to(torch.int8)


def test_transpose_and_mm():
    q = compress_weight(weight(32, 64), PBS2P(n=4, m=8))
    x = torch.randn(5, 64)
    assert q.t().shape == (64, 32)
    torch.testing.assert_close(torch.mm(x, q.t()), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)
    bias = torch.randn(32)
    torch.testing.assert_close(torch.addmm(bias, x, q.t()), F.linear(x, q.dequantize(), bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("start", "end"), [(0, 64), (64, 100), (10, 20), (90, None)])
def test_slice_rows(start, end):
    q = compress_weight(weight(100, 64), PBS2P(n=4, m=8))
    s = q[start:end]
    assert isinstance(s, BinarySparseTensor)
    assert torch.equal(s.dequantize(), q.dequantize()[start:end])


def test_clone_detach_deepcopy():
    q = compress_weight(weight(64, 64), PBS2P(n=4, m=8))
    for other in (q.clone(), q.detach(), copy.deepcopy(q)):
        assert isinstance(other, BinarySparseTensor)
        assert torch.equal(other.dequantize(), q.dequantize())
    assert copy.deepcopy(q).qdata.data_ptr() != q.qdata.data_ptr()


def test_repr_says_what_it_is():
    text = repr(compress_weight(weight(64, 64), PBS2P(n=4, m=8)))
    assert "4:8" in text and "bits_per_weight" in text


def test_refuses_other_format_version():
    q = compress_weight(weight(64, 64), PBS2P(n=4, m=8))
    with pytest.raises(ValueError, match="format version 99"):
        BinarySparseTensor(q.qdata, q.alpha, q.mu, 4, 8, 64, 99)
    assert packing.FORMAT_VERSION == 1


def test_checksum_refuses_changed_content():
    q = compress_weight(weight(64, 64), PBS2P(n=4, m=8))
    assert q.checksum is not None and q.clone().checksum == q.checksum
    flipped = q.qdata.clone()
    flipped.view(-1)[5] ^= 1
    with pytest.raises(ValueError, match="does not match its checksum"):
        BinarySparseTensor(flipped, q.scale, q.zero_point, 4, 8, 64, 1, False, q.checksum)
    assert q.to(torch.bfloat16).checksum != q.checksum  # new content, new checksum


def test_inconsistent_parts_refused():
    q = compress_weight(weight(64, 64), PBS2P(n=4, m=8))
    with pytest.raises(ValueError, match="tampered or truncated"):
        BinarySparseTensor(q.qdata[:, :, :40], q.scale, q.zero_point, 4, 8, 64, 1)
    with pytest.raises(ValueError, match="tampered or truncated"):
        BinarySparseTensor(q.qdata, q.scale[:, :0], q.zero_point, 4, 8, 64, 1)
