"""The packed format: round trips, exact N per group, honest sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pbs2p.kernels import packing

ALL_NM = [(n, m) for m in (4, 8, 16) for n in range(1, m)]


def random_nm(out: int, k: int, n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(out, k // m, m, generator=g).topk(n, -1).indices
    mask = torch.zeros(out, k // m, m, dtype=torch.bool).scatter_(-1, top, True).reshape(out, k)
    signs = (torch.rand(out, k, generator=g) > 0.5) & mask
    return mask, signs


@given(
    nm=st.sampled_from(ALL_NM), out=st.integers(1, 140), groups=st.integers(1, 9), seed=st.integers(0, 2**16)
)
def test_pack_unpack_round_trip(nm, out, groups, seed):
    n, m = nm
    mask, signs = random_nm(out, groups * m, n, m, seed)
    codes = packing.pack(mask, signs, n, m)
    mask2, signs2 = packing.unpack(codes, n, m, out)
    assert torch.equal(mask2, mask) and torch.equal(signs2, signs)
    assert codes.dtype == torch.uint8
    assert codes.shape == (packing.padded_rows(out) // 64, groups, packing.nm_tables(n, m).block_bytes)


@pytest.mark.parametrize(
    ("n", "m", "bits"), [(2, 4, 5), (4, 8, 11), (5, 8, 11), (6, 8, 11), (8, 16, 22), (1, 4, 3)]
)
def test_group_bits_are_compact(n, m, bits):
    # ceil(log2 C(m, n)) index bits + n sign bits per group
    assert packing.nm_tables(n, m).group_bits == bits


def test_tables_rank_every_mask():
    t = packing.nm_tables(5, 8)
    assert len(t.masks) == 56
    assert torch.equal(t.rank_of_mask[t.masks], torch.arange(56))
    assert (t.kept.sum(1) == 5).all()


def test_pack_rejects_wrong_group_counts():
    mask, signs = random_nm(4, 16, 4, 8, 0)
    mask[2, 0] = ~mask[2, 0]
    with pytest.raises(ValueError, match="row 2 has a group with"):
        packing.pack(mask, signs, 4, 8)


def test_pack_rejects_k_not_multiple_of_m():
    with pytest.raises(ValueError, match="not a multiple of M = 8"):
        packing.pack(torch.ones(2, 12, dtype=torch.bool), torch.ones(2, 12, dtype=torch.bool), 4, 8)


@pytest.mark.parametrize(("n", "m"), [(0, 8), (8, 8), (9, 8), (2, 6), (2, 32)])
def test_check_nm_rejects(n, m):
    with pytest.raises(ValueError):
        packing.check_nm(n, m)
