"""Output-aware α/μ refit and the group-level act-order permutation."""

from __future__ import annotations

import torch
from alg_helpers import make_layer
from hypothesis import given
from hypothesis import strategies as st

from pbs2p.algorithms.binarize import fit_binary
from pbs2p.algorithms.binarized import dequantize_parts
from pbs2p.algorithms.compress import group_order
from pbs2p.algorithms.metrics import output_error_sq
from pbs2p.algorithms.nm_mask import nm_mask_from_scores
from pbs2p.algorithms.refit import hessian_refit_levels


@given(seed=st.integers(0, 10_000), sb=st.sampled_from([8, 16, 40, 64]))
def test_refit_never_increases_output_error(seed, sb):
    W, H, _ = make_layer(seed, out=6, cols=64, samples=96)
    mask = nm_mask_from_scores(W.abs(), 4, 8)
    signs, alpha, mu = fit_binary(W, mask, sb)
    before = output_error_sq(W, dequantize_parts(mask, signs, alpha, mu, sb), H)
    a2, m2 = hessian_refit_levels(W, H, mask, signs, alpha, mu, sb)
    after = output_error_sq(W, dequantize_parts(mask, signs, a2, m2, sb), H)
    assert (a2 >= 0).all()
    assert after <= before * (1 + 1e-6) + 1e-9


def test_refit_is_the_least_squares_optimum():
    W, H, _ = make_layer(1, out=4, cols=32)
    mask = torch.ones(4, 32, dtype=torch.bool)
    signs, alpha, mu = fit_binary(W, mask, 32)
    a2, m2 = hessian_refit_levels(W, H, mask, signs, alpha, mu, 32)
    best = output_error_sq(W, dequantize_parts(mask, signs, a2, m2, 32), H)
    for da, dm in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        moved = output_error_sq(W, dequantize_parts(mask, signs, a2 + da, m2 + dm, 32), H)
        assert moved >= best


@given(seed=st.integers(0, 1000), m=st.sampled_from([4, 8]), sb=st.sampled_from([16, 32, 64, 1000]))
def test_group_order_keeps_groups_and_blocks(seed, m, sb):
    cols = 64
    h = torch.rand(cols, generator=torch.Generator().manual_seed(seed))
    perm = group_order(h, m, min(sb, cols))
    assert sorted(perm.tolist()) == list(range(cols))
    groups = perm.view(-1, m)
    assert (groups - groups[:, :1] == torch.arange(m)).all()  # whole groups, in order
    assert (groups[:, 0] % m == 0).all()
    blk = min(sb, cols)
    assert ((perm.view(-1, blk) // blk) == torch.arange(cols // blk).unsqueeze(1)).all()  # inside blocks


def test_group_order_refuses_straddling_blocks():
    assert group_order(torch.rand(64), 8, 12) is None
