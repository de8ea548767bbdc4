"""Correctness of the method core against its definitions: identities, references, invariances.

Each test here fails for a class of real bugs (sign or scale errors in the compensation, a dropped refit,
reversed act-order, dead inputs not handled, a CFS allocation decided by block order): layers span
several compensation blocks and the checks are exact identities or slow reference implementations.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from pbs2p.algorithms import BinarizedWeight, allocate_n, compress, prepare_hessian
from pbs2p.algorithms.hessian import output_error_sq, relative_output_error
from pbs2p.algorithms.method import fit_binary, group_order, prune_cost, refit, schedule, spbo, sweep, top_n

NMS = [(2, 4), (4, 8), (5, 8), (6, 8)]
COLS = 448  # 3 blocks of 128 and a partial fourth


def _layer(seed: int, out: int = 24, cols: int = COLS, dead: int = 3):
    W, H, He = make_layer(seed, out=out, cols=cols, samples=2 * cols)
    if dead:  # some inputs that are always zero
        idx = torch.randperm(cols, generator=torch.Generator().manual_seed(seed))[:dead]
        for h in (H, He):
            h[idx, :] = 0.0
            h[:, idx] = 0.0
    return W, H, He


def _levels(W, n, m, sb, seed):
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(W.shape[1] / sb)
    alpha = W.abs().mean() * (0.5 + torch.rand(W.shape[0], nb, generator=g))
    return alpha, 0.1 * alpha * torch.randn(W.shape[0], nb, generator=g)


# -------------------------------------------------------------------------- compensation identities
@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), nm=st.sampled_from(NMS), comp=st.sampled_from(["column", "block"]),
       sb=st.sampled_from([None, 64]), oneshot=st.booleans())
def test_gptq_identity_output_error_equals_sum_of_scaled_errors(seed, nm, comp, sb, oneshot):
    """tr((W−Q)H(W−Q)ᵀ) = Σ_j ‖err_j‖² for the exact (column or block) updates, across blocks."""
    n, m = nm
    W, H, _ = _layer(seed)
    prep = prepare_hessian(H)
    sb = sb or COLS
    levels = _levels(W, n, m, sb, seed)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    mask, signs, _, loss = sweep(W, prep, n, m, levels=levels, scale_block=sb, pruned=pruned, oneshot=oneshot,
                                 compensation=comp, block_size=128)
    Wr = W.clone()
    Wr[:, prep.dead] = 0.0
    Q = BinarizedWeight(mask, signs, *levels, sb).dequantize()
    assert output_error_sq(Wr, Q, prep.H) == pytest.approx(loss, rel=2e-4)


@pytest.mark.parametrize("comp", ["column", "block", "block-diag", "none"])
def test_reported_error_is_the_output_error_for_a_diagonal_hessian(comp):
    """With independent inputs (diagonal H) nothing propagates and every way of scaling the errors is exact:
    each compensation (and none) reports the true output error tr((W−Q)H(W−Q)ᵀ), errors divided by U_jj."""
    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    H = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(3)) * 4 + 0.1)
    prep = prepare_hessian(H)
    levels = _levels(W, 4, 8, 256, 2)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    mask, signs, _, loss = sweep(W, prep, 4, 8, levels=levels, scale_block=256, pruned=pruned, oneshot=False,
                                 compensation=comp, block_size=128)
    Q = BinarizedWeight(mask, signs, *levels, 256).dequantize()
    assert output_error_sq(W, Q, prep.H) == pytest.approx(loss, rel=1e-5)


def _reference_column_sweep(W, prep, n, m, levels, sb, oneshot):
    """GPTQ/SparseGPT as written in the papers: full-matrix update after every column (no lazy batches)."""
    W = W.double().clone()
    W[:, prep.dead] = 0.0
    U = prep.U.double()
    alpha, mu = (t.double() for t in levels)
    out, cols = W.shape
    mask = torch.zeros(out, cols, dtype=torch.bool)
    signs = torch.zeros(out, cols, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            w, v = W[:, j:j + m], 1 / torch.diagonal(U)[j:j + m] ** 2
            a, u = alpha[:, j // sb:j // sb + 1], mu[:, j // sb:j // sb + 1]
            scores = w**2 * v if oneshot else v * (w**2 - ((w - u).abs() - a) ** 2)
            mask[:, j:j + m] = top_n(scores, n, m)
        a, u = alpha[:, j // sb], mu[:, j // sb]
        signs[:, j] = (W[:, j] >= u) & mask[:, j]
        q = torch.where(mask[:, j], torch.where(W[:, j] >= u, u + a, u - a), torch.zeros(()).double())
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return mask, signs


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), nm=st.sampled_from(NMS), oneshot=st.booleans())
def test_column_sweep_matches_the_textbook_algorithm(seed, nm, oneshot):
    n, m = nm
    W, H, _ = _layer(seed, out=12, cols=320)
    prep = prepare_hessian(H)
    levels = _levels(W, n, m, 320, seed)
    mask, signs, _, _ = sweep(W, prep, n, m, levels=levels, scale_block=320, oneshot=oneshot, compensation="column",
                              pruned=torch.zeros_like(W, dtype=torch.bool), block_size=128)
    ref_mask, ref_signs = _reference_column_sweep(W, prep, n, m, levels, 320, oneshot)
    assert (mask != ref_mask).float().mean() < 0.002 and (signs != ref_signs).float().mean() < 0.002


@pytest.mark.parametrize("comp", ["column", "block", "block-diag"])
@pytest.mark.parametrize("nm", NMS)
def test_compensation_never_worse_than_none_on_heldout(comp, nm):
    n, m = nm
    layers = [_layer(seed) for seed in range(6)]
    errors = {c: [relative_output_error(W, compress(W, H, n, m, compensation=c).dequantize(), He)
                  for W, H, He in layers] for c in (comp, "none")}
    assert sum(errors[comp]) < sum(errors["none"])
    if comp != "block-diag":  # the exact updates win on every layer
        assert all(a < b for a, b in zip(errors[comp], errors["none"], strict=True))


# ------------------------------------------------------------------------------------ SPBO
def _reference_spbo(W, n, m, steps):
    """SPBO on the full matrix with masked fits: prune by Δ under the current levels, refit, repeat."""
    mask = torch.ones_like(W, dtype=torch.bool)
    signs, alpha, mu = fit_binary(W, mask, W.shape[1])
    for pruned in schedule(n, m, steps):
        cost = prune_cost(W, alpha, mu).masked_fill(~mask, -math.inf)  # pruned ones stay pruned
        mask = top_n(cost, m - pruned, m)  # keep the weights whose pruning would cost the most
        signs, alpha, mu = fit_binary(W, mask, W.shape[1])
    return mask, signs, alpha, mu


@settings(max_examples=50)
@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8), (5, 8), (6, 8), (7, 8),
                                                       (8, 16), (11, 16)]), steps=st.sampled_from([None, 1, 2, 3]))
def test_spbo_matches_its_definition(seed, nm, steps):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(16, 8 * m, generator=g) + 0.5 * torch.randn(16, 1, generator=g)
    got = spbo(W, n, m, scale_block=8 * m, steps=steps)
    ref = _reference_spbo(W, n, m, steps)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2])
    torch.testing.assert_close(got[3], ref[3])


def test_schedule():
    assert schedule(4, 8, None) == [1, 2, 3, 4]
    assert schedule(4, 8, 1) == [4]
    assert schedule(4, 8, 3) == [1, 3, 4]
    assert schedule(6, 8, 5) == [1, 2]  # more steps than weights to prune: one per weight
    assert schedule(2, 4, 2) == [1, 2]
    assert schedule(8, 8, None) == [0]


def test_progressive_steps_beat_pruning_at_once():
    """The refits between steps are what SPBO adds: with them, τ = m − n beats τ = 1 (no refit) on average."""
    for calibrated in (False, True):
        wins, total = 0, [0.0, 0.0]
        for seed in range(12):
            W, H, He = _layer(seed, cols=256, dead=0)
            h = H if calibrated else None
            errs = [relative_output_error(W, compress(W, h, 4, 8, spbo_steps=s, extras=[]).dequantize(),
                                          He if calibrated else None) for s in (None, 1)]
            wins += errs[0] < errs[1]
            total = [total[0] + errs[0], total[1] + errs[1]]
        assert total[0] < total[1] and wins >= 8, (calibrated, wins, total)


def test_calibrated_equals_data_free_when_h_is_the_identity():
    """With H ∝ I nothing is compensated and every column weighs the same: SPBO with data selects what SPBO
    without data selects. (The levels differ by design: with data, the last step keeps the levels its sweep
    binarized with, which its pushed errors assume; without data, the binarizer is refitted once more.)"""
    for n, m in NMS:
        W = torch.randn(32, 128, generator=torch.Generator().manual_seed(n * m)) + 0.3
        free = compress(W, None, n, m)
        for comp in ("column", "block", "block-diag"):
            cal = compress(W, 3.0 * torch.eye(128), n, m, compensation=comp, extras=["obs_weights"])
            assert torch.equal(cal.mask, free.mask) and torch.equal(cal.signs, free.signs)


def test_calibrated_one_shot_equals_data_free_one_shot_when_h_is_the_identity():
    """One-shot (``spbo_steps=0``) with H ∝ I: the kept set is the largest magnitudes and the levels are the
    binarizer's fit on that set, as without data (levels and signs included: the start levels are fitted on
    the one-shot selection, not on the whole row)."""
    for n, m in NMS:
        W = torch.randn(32, 128, generator=torch.Generator().manual_seed(n * m)) + 0.3
        free = compress(W, None, n, m, spbo_steps=0)
        for comp in ("column", "block", "block-diag"):
            cal = compress(W, 3.0 * torch.eye(128), n, m, spbo_steps=0, compensation=comp, extras=["obs_weights"])
            assert torch.equal(cal.mask, free.mask) and torch.equal(cal.signs, free.signs)
            torch.testing.assert_close(cal.alpha, free.alpha)
            torch.testing.assert_close(cal.mu, free.mu)


# ------------------------------------------------------------------------- refit and act-order
def test_refit_equals_least_squares():
    W, H, _ = _layer(5, out=6, cols=64, dead=0)
    mask = top_n(torch.rand(6, 64, generator=torch.Generator().manual_seed(0)), 4, 8)
    signs = (torch.rand(6, 64, generator=torch.Generator().manual_seed(1)) > 0.5) & mask
    alpha, mu = torch.ones(6, 2), torch.zeros(6, 2)
    a, u, err = refit(W, H, mask, signs, alpha, mu, 32)
    L = torch.linalg.cholesky(H.double() + 1e-9 * torch.eye(64))
    for r in range(6):  # min ‖(w − Dθ)ᵀ L‖ over θ = (α₀, α₁, μ₀, μ₁)
        b = torch.where(signs[r], 1.0, -1.0).double() * mask[r]
        D = torch.stack([b * (torch.arange(64) < 32), b * (torch.arange(64) >= 32),
                         mask[r] * (torch.arange(64) < 32), mask[r] * (torch.arange(64) >= 32)], 1).double()
        theta = torch.linalg.lstsq(L.T @ D, L.T @ W[r].double()).solution
        if (theta[:2] >= 0).all():
            torch.testing.assert_close(torch.cat([a[r], u[r]]).double(), theta, rtol=1e-3, atol=1e-5)
    Q = BinarizedWeight(mask, signs, a, u, 32).dequantize()
    assert err == pytest.approx(output_error_sq(W, Q, H), rel=1e-4)


def test_act_order_is_a_permutation_of_the_problem():
    """compress with act-order = compress without it on the permuted problem, permuted back."""
    W, H, _ = _layer(7, cols=256, dead=0)
    for n, m in NMS:
        perm = group_order(torch.diagonal(H), m, 256)
        assert perm.tolist() != list(range(256))
        act = compress(W, H, n, m)
        plain = compress(W[:, perm], H[perm][:, perm], n, m, extras=["refit", "obs_weights"])
        inv = torch.argsort(perm)
        assert torch.equal(act.mask, plain.mask[:, inv]) and torch.equal(act.signs, plain.signs[:, inv])
        torch.testing.assert_close(act.alpha, plain.alpha)


# ------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("scale", [2.0**-14, 2.0**10])
@pytest.mark.parametrize("extras", [[], ["act_order", "refit", "obs_weights"]])
def test_scale_of_h_changes_nothing_even_with_dead_inputs(scale, extras):
    """H and c·H describe the same layer: bit-identical results (c a power of two: exact arithmetic)."""
    W, H, _ = _layer(11, cols=256, dead=8)
    for n, m in [(2, 4), (4, 8)]:
        a, b = compress(W, H, n, m, extras=extras), compress(W, scale * H, n, m, extras=extras)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.signs, b.signs)
        assert torch.equal(a.alpha, b.alpha) and torch.equal(a.mu, b.mu)


def test_weights_of_dead_inputs_do_not_matter():
    W, H, _ = _layer(13, cols=256, dead=8)
    dead = torch.diagonal(H) == 0
    W2 = W.clone()
    W2[:, dead] = torch.randn(W.shape[0], int(dead.sum()))
    a, b = compress(W, H, 4, 8), compress(W2, H, 4, 8)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.alpha, b.alpha)


@settings(max_examples=60)
@given(cos=st.lists(st.floats(0.01, 0.99), min_size=3, max_size=30, unique=True), seed=st.integers(0, 999),
       nm=st.sampled_from([(4, 8), (6, 8), (5, 8), (8, 16)]), normalize=st.sampled_from(["mean", "median"]),
       outlier=st.booleans())
def test_cfs_allocation_follows_a_permutation_of_the_blocks(cos, seed, nm, normalize, outlier):
    """Permuting the blocks' cosines permutes the allocation, also with one block of cosine ≈ 0 (SmolLM2's
    first block: 0.006), where with the mean every other block's ideal N falls below the bound and ties
    decide."""
    n, m = nm
    if outlier:
        cos = [0.006, *cos]
    perm = torch.randperm(len(cos), generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [7] * len(cos)
    base = allocate_n(cos, n, m, n - 1, n + 1, sizes, normalize=normalize)
    permuted = allocate_n([cos[i] for i in perm], n, m, n - 1, n + 1, sizes, normalize=normalize)
    assert permuted == [base[i] for i in perm]
    assert sum(base) == n * len(cos)
