"""The method core for one weight (pbs2p.algorithms.method): binarizer, SPBO, selection, refit, compress."""

from __future__ import annotations

import pytest
import torch
from helpers import make_layer
from hypothesis import given
from hypothesis import strategies as st

from pbs2p.algorithms import EXTRAS, BinarizedWeight, compress
from pbs2p.algorithms.hessian import output_error_sq
from pbs2p.algorithms.method import fit_binary, fit_values, group_order, refit, spbo, top_n
from pbs2p.kernels.packing import expand_scales

NM = [(n, m) for m in (4, 8, 16) for n in range(1, m)]


def _rand(seed: int, out: int, cols: int, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) + torch.randn(out, 1, generator=g)  # nonzero row means
    return W * torch.randn(out, cols, generator=g).abs().pow(2) if heavy else W


def _dense(mask, signs, alpha, mu, sb):
    return BinarizedWeight(mask, signs, alpha, mu, sb).dequantize()


def _err(W, res, sb, v=None):
    E = (W - _dense(*res, sb)).square()
    return float((E * (1 if v is None else v)).sum())


def _is_nm(mask, n, m):
    return bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())


# ------------------------------------------------------------------------------------------ binarizer
@given(seed=st.integers(0, 10_000), out=st.integers(1, 6), cols=st.integers(1, 40), sb=st.integers(1, 48),
       rounds=st.integers(0, 6), density=st.floats(0.0, 1.0), heavy=st.booleans())
def test_fit_error_bounded_and_alpha_nonnegative(seed, out, cols, sb, rounds, density, heavy):
    W = _rand(seed, out, cols, heavy)
    mask = torch.rand(out, cols, generator=torch.Generator().manual_seed(seed + 1)) < density
    signs, alpha, mu = fit_binary(W, mask, sb, rounds=rounds)
    sb_eff = min(sb, cols)
    W_hat = _dense(mask, signs, alpha, mu, sb_eff)
    assert (alpha >= 0).all() and not (signs & ~mask).any()
    assert alpha.shape == mu.shape == (out, -(-cols // sb_eff))
    assert torch.linalg.norm(W - W_hat) <= torch.linalg.norm(W) * (1 + 1e-5) + 1e-6
    assert (W_hat[~mask] == 0).all()


@given(seed=st.integers(0, 10_000), heavy=st.booleans(), weighted=st.booleans())
def test_refinement_never_increases_error(seed, heavy, weighted):
    W = _rand(seed, 8, 48, heavy)
    mask = torch.rand(8, 48, generator=torch.Generator().manual_seed(seed)) < 0.6
    v = torch.rand(48, generator=torch.Generator().manual_seed(seed + 7)) + 0.05 if weighted else None
    prev = None
    for rounds in range(6):
        signs, alpha, mu = fit_binary(W, mask, 16, rounds=rounds, col_weight=v)
        err = _err(W, (mask, signs, alpha, mu), 16, v)
        assert prev is None or err <= prev * (1 + 1e-5) + 1e-7
        prev = err


def test_compact_and_masked_fits_agree():
    W = _rand(3, 16, 64)
    a = fit_binary(W, torch.ones(16, 64, dtype=torch.bool), 32, rounds=3)  # dense fast path
    pos, alpha, mu = fit_values(W.reshape(16, 2, 32), torch.ones(1, 2, 32), rounds=3)  # weighted path
    assert torch.equal(a[0], pos.reshape(16, 64))
    torch.testing.assert_close(a[1], alpha)
    torch.testing.assert_close(a[2], mu)


def test_column_weights_are_used_on_every_path():
    """``fit_binary`` with column weights: the whole-weight fast path (all kept, whole scale blocks) and the
    masked path give the weighted binarizer of each scale block, not the unweighted one."""
    g = torch.Generator().manual_seed(3)
    W, v = torch.randn(4, 64, generator=g) + 0.5, torch.rand(64, generator=g) + 0.1
    ref = fit_values(W.reshape(4, 4, 16), v.reshape(1, 4, 16))
    fast = fit_binary(W, torch.ones_like(W, dtype=torch.bool), 16, col_weight=v)
    assert torch.equal(fast[0], ref[0].reshape(4, 64))
    assert torch.allclose(fast[1], ref[1]) and torch.allclose(fast[2], ref[2])
    assert not torch.allclose(fast[1], fit_binary(W, torch.ones_like(W, dtype=torch.bool), 16)[1])
    mask = torch.rand(4, 64, generator=g) > 0.3
    masked = fit_binary(W, mask, 16, col_weight=v)
    ref = fit_values(W.reshape(4, 4, 16), (mask * v).reshape(4, 4, 16))
    assert torch.allclose(masked[1], ref[1]) and torch.allclose(masked[2], ref[2])


@pytest.mark.parametrize("rounds", [0, 1])
def test_refinement_rounds_are_honoured(rounds):
    """``rounds=0`` is the closed form (μ = mean, α = mean|w − μ|); more rounds change the levels."""
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(5)).pow(3)
    mask = torch.rand(6, 32, generator=torch.Generator().manual_seed(6)) > 0.4
    for m_ in (torch.ones_like(mask), mask):
        _, alpha, mu = fit_binary(W, m_, 16, rounds=rounds)
        _, alpha3, mu3 = fit_binary(W, m_, 16, rounds=3)
        assert not torch.allclose(mu, mu3)
        if rounds == 0:
            k = m_.float().reshape(6, 2, 16)
            mean = (W.reshape(6, 2, 16) * k).sum(-1) / k.sum(-1)
            assert torch.allclose(mu, mean, atol=1e-6)
            assert torch.allclose(alpha, ((W.reshape(6, 2, 16) - mean[..., None]).abs() * k).sum(-1) / k.sum(-1),
                                  atol=1e-6)


def test_a_scale_block_with_nothing_kept_has_zero_levels():
    W = torch.randn(3, 32, generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(W, dtype=torch.bool)
    mask[1, 16:] = False
    signs, alpha, mu = fit_binary(W, mask, 16)
    assert alpha[1, 1] == 0 and mu[1, 1] == 0 and not signs[1, 16:].any()
    assert torch.isfinite(alpha).all() and torch.isfinite(mu).all() and (alpha[0] > 0).all()


def test_closed_form_on_symmetric_row():
    W = torch.tensor([[-2.0, -1.0, 1.0, 2.0]])
    signs, alpha, mu = fit_binary(W, torch.ones_like(W, dtype=torch.bool), 4, rounds=0)
    assert signs.tolist() == [[False, False, True, True]]
    torch.testing.assert_close(alpha, torch.tensor([[1.5]]))
    torch.testing.assert_close(mu, torch.tensor([[0.0]]))


# -------------------------------------------------------------------------------- selection, SPBO
@given(seed=st.integers(0, 10_000), m=st.sampled_from([2, 4, 8, 16]), data=st.data(), ties=st.booleans())
def test_top_n_keeps_exactly_the_highest(seed, m, data, ties):
    n = data.draw(st.integers(1, m))
    scores = torch.randn(5, 4 * m, generator=torch.Generator().manual_seed(seed))
    scores = scores.round() if ties else scores
    mask = top_n(scores, n, m)
    assert _is_nm(mask, n, m)
    gs, gm = scores.view(5, 4, m), mask.view(5, 4, m)
    assert (torch.where(gm, gs, torch.inf).min(-1).values >= torch.where(~gm, gs, -torch.inf).max(-1).values).all()


def _oneshot(W, n, m, sb):
    mask = top_n(W.square(), n, m)
    return (mask, *fit_binary(W, mask, sb))


@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8), (5, 8), (6, 8), (7, 8),
                                                       (8, 16), (12, 16)]),
       steps=st.one_of(st.none(), st.integers(1, 9)), sb=st.sampled_from([None, 16, 32]))
def test_spbo_any_schedule_gives_exact_nm(seed, nm, steps, sb):
    n, m = nm
    W = torch.randn(6, 48, generator=torch.Generator().manual_seed(seed))
    sb = 48 if sb is None or sb % m else sb
    mask, signs, alpha, mu = spbo(W, n, m, scale_block=sb, steps=steps)
    assert _is_nm(mask, n, m) and not (signs & ~mask).any() and (alpha >= 0).all()
    assert torch.linalg.norm(W - _dense(mask, signs, alpha, mu, sb)) <= torch.linalg.norm(W)


@pytest.mark.parametrize(("n", "m"), [(4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("steps", [None, 1, 2])
def test_spbo_scale_blocks_are_independent_also_a_partial_last_one(n, m, steps):
    """α, μ and the pruning of a scale block depend on that block alone: a weight whose last scale block
    is partial gives, block by block, what SPBO gives on each block's columns by themselves."""
    W = torch.randn(5, 80, generator=torch.Generator().manual_seed(n * 10 + m)) + 0.7
    whole = spbo(W, n, m, scale_block=32, steps=steps)
    parts = [spbo(W[:, a:b], n, m, scale_block=32, steps=steps) for a, b in ((0, 32), (32, 64), (64, 80))]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts], 1))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts], 1))
    assert torch.allclose(whole[2], torch.cat([p[2] for p in parts], 1), atol=1e-6)
    assert torch.allclose(whole[3], torch.cat([p[3] for p in parts], 1), atol=1e-6)


def test_spbo_keeps_its_tensors_on_the_weight_device():
    """No tensor of SPBO is created on a fixed device (the meta device stands in for a second device type)."""
    mask, signs, alpha, mu = spbo(torch.randn(4, 80, device="meta"), 4, 8, scale_block=32)
    assert {t.device.type for t in (mask, signs, alpha, mu)} == {"meta"}
    assert mask.dtype == signs.dtype == torch.bool and tuple(alpha.shape) == (4, 3)


def test_progressive_differs_from_a_ranking_fixed_up_front():
    """A ranking fixed at the start would make progressive pruning one-shot pruning; SPBO re-scores."""
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) + 0.8 * torch.randn(64, 1)
    assert not torch.equal(spbo(W, 4, 8, scale_block=128)[0], _oneshot(W, 4, 8, 128)[0])


def test_spbo_beats_magnitude_oneshot():
    wins, total_s, total_o = 0, 0.0, 0.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(32, 128, generator=g) + 0.5 * torch.randn(32, 1, generator=g)
        W = W * torch.randn(32, 128, generator=g).abs() if seed % 2 else W
        e_s, e_o = _err(W, spbo(W, 4, 8, scale_block=128), 128), _err(W, _oneshot(W, 4, 8, 128), 128)
        wins, total_s, total_o = wins + (e_s < e_o), total_s + e_s, total_o + e_o
    assert total_s < total_o and wins >= 15


def test_pruning_plus_binarization_beats_dense_binarization():
    """The paper's SPBO claim in weight space: 4:8 + binarization below binarizing everything."""
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    assert _err(W, spbo(W, 4, 8, scale_block=256), 256) < _err(W, spbo(W, 8, 8, scale_block=256), 256)


# ------------------------------------------------------------------------------- refit, act-order
@given(seed=st.integers(0, 10_000), sb=st.sampled_from([8, 16, 40, 64]))
def test_refit_never_increases_output_error(seed, sb):
    W, H, _ = make_layer(seed, out=6, cols=64, samples=96)
    mask = top_n(W.abs(), 4, 8)
    signs, alpha, mu = fit_binary(W, mask, sb)
    before = output_error_sq(W, _dense(mask, signs, alpha, mu, sb), H)
    a2, m2, err = refit(W, H, mask, signs, alpha, mu, sb)
    after = output_error_sq(W, _dense(mask, signs, a2, m2, sb), H)
    assert (a2 >= 0).all() and after <= before * (1 + 1e-6) + 1e-9
    assert err == pytest.approx(after, rel=1e-4, abs=1e-6)


def test_refit_is_the_least_squares_optimum():
    W, H, _ = make_layer(1, out=4, cols=32)
    mask = torch.ones(4, 32, dtype=torch.bool)
    signs, alpha, mu = fit_binary(W, mask, 32)
    a2, m2, _ = refit(W, H, mask, signs, alpha, mu, 32)
    best = output_error_sq(W, _dense(mask, signs, a2, m2, 32), H)
    for da, dm in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert output_error_sq(W, _dense(mask, signs, a2 + da, m2 + dm, 32), H) >= best


@given(seed=st.integers(0, 1000), m=st.sampled_from([4, 8]), sb=st.sampled_from([16, 32, 64]))
def test_group_order_keeps_groups_and_blocks(seed, m, sb):
    h = torch.rand(64, generator=torch.Generator().manual_seed(seed))
    perm = group_order(h, m, sb)
    assert sorted(perm.tolist()) == list(range(64))
    groups = perm.view(-1, m)
    assert (groups - groups[:, :1] == torch.arange(m)).all() and (groups[:, 0] % m == 0).all()
    assert ((perm.view(-1, sb) // sb) == torch.arange(64 // sb).unsqueeze(1)).all()
    sums = h.view(-1, m).sum(1)[groups[:, 0] // m].view(-1, sb // m)  # decreasing inside each block
    assert (sums[:, :-1] >= sums[:, 1:]).all()


# ------------------------------------------------------------------------------------ compress
def _check(bw: BinarizedWeight, W: torch.Tensor, n: int, m: int) -> None:
    out, cols = W.shape
    assert bw.mask.dtype == bw.signs.dtype == torch.bool and bw.mask.shape == W.shape
    assert _is_nm(bw.mask, n, m) and not (bw.signs & ~bw.mask).any()
    assert bw.alpha.shape == bw.mu.shape == (out, -(-cols // bw.scale_block))
    assert bw.alpha.dtype == bw.mu.dtype == torch.float32 and (bw.alpha >= 0).all()
    a, u = expand_scales(bw.alpha, bw.scale_block, cols), expand_scales(bw.mu, bw.scale_block, cols)
    torch.testing.assert_close(bw.dequantize(), bw.mask * (a * (2 * bw.signs.float() - 1) + u))


@given(seed=st.integers(0, 10_000), nm=st.sampled_from(NM), groups=st.integers(1, 5), out=st.integers(1, 9),
       sbg=st.sampled_from([None, 1, 2, 1000]), steps=st.sampled_from([None, 0, 1, 3]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_data_free_contract(seed, nm, groups, out, sbg, steps, dtype):
    n, m = nm
    W = torch.randn(out, groups * m, generator=torch.Generator().manual_seed(seed)).to(dtype)
    bw = compress(W, None, n, m, scale_block=None if sbg is None else sbg * m, spbo_steps=steps)
    _check(bw, W, n, m)
    assert torch.linalg.norm(W.float() - bw.dequantize()) <= torch.linalg.norm(W.float()) * (1 + 1e-5)


@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(2, 4), (4, 8), (6, 8), (1, 8), (8, 16)]),
       sb=st.sampled_from([None, 16]), comp=st.sampled_from(["column", "block", "block-diag", "none"]),
       steps=st.sampled_from([None, 0, 1]), block=st.sampled_from([16, 32, 128]),
       extras=st.sampled_from([EXTRAS, (), ("act_order",), ("refit",), ("obs_weights",)]))
def test_calibrated_contract(seed, nm, sb, comp, steps, block, extras):
    n, m = nm
    W, H, _ = make_layer(seed, out=8, cols=48, samples=128)
    bw = compress(W, H, n, m, scale_block=sb, compensation=comp, spbo_steps=steps, block_size=block, extras=extras)
    _check(bw, W, n, m)
    if "refit" in extras:  # the least-squares refit makes Ŵ no worse than 0 on the calibration data
        assert output_error_sq(W, bw.dequantize(), H) <= output_error_sq(W, torch.zeros_like(W), H) * (1 + 1e-4)


def test_deterministic_bit_identical():
    W, H, _ = make_layer(0, out=16, cols=64)
    for h in (None, H):
        a = compress(W, h, 4, 8)
        b = compress(W.clone(), None if h is None else h.clone(), 4, 8)
        for x, y in zip((a.mask, a.signs, a.alpha, a.mu), (b.mask, b.signs, b.alpha, b.mu), strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("W", "H", "kw", "match"),
    [
        (torch.randn(4, 12), None, dict(n=4, m=8), "multiple of M"),
        (torch.randn(4, 16), None, dict(n=9, m=8), "1 <= N <= M"),
        (torch.randn(4, 16), None, dict(n=0, m=8), "1 <= N"),
        (torch.randn(16), None, dict(n=4, m=8), "2-D"),
        (torch.randint(0, 3, (4, 16)), None, dict(n=4, m=8), "floating-point"),
        (torch.tensor([[float("nan")] * 8]), None, dict(n=4, m=8), "NaN or Inf"),
        (torch.tensor([[float("inf")] * 8]), None, dict(n=4, m=8), "NaN or Inf"),
        (torch.randn(4, 16), torch.eye(8), dict(n=4, m=8), r"\[16, 16\]"),
        (torch.randn(4, 16), torch.ones(16, 15), dict(n=4, m=8), r"\[16, 16\]"),
        (torch.randn(4, 16), torch.full((16, 16), float("nan")), dict(n=4, m=8), "H contains NaN"),
        (torch.randn(4, 16), torch.eye(16, dtype=torch.int64), dict(n=4, m=8), "floating-point"),
        (torch.randn(4, 16), None, dict(n=4, m=8, scale_block=12), "scale_block"),
        (torch.randn(4, 16), torch.eye(16), dict(n=4, m=8, compensation="magic"), "compensation"),
        (torch.randn(4, 16), torch.eye(16), dict(n=4, m=8, extras=("magic",)), "extras"),
    ],
)
def test_input_validation(W, H, kw, match):
    kw = dict(kw)  # the parametrized dict is shared between runs of this test
    n, m = kw.pop("n"), kw.pop("m")
    with pytest.raises(ValueError, match=match):
        compress(W, H, n, m, **kw)


def test_dead_inputs_and_rank_deficient_hessian():
    W, H, _ = make_layer(3, out=8, cols=32)
    H = H.clone()
    H[5, :] = H[:, 5] = 0
    _check(compress(W, H, 2, 4), W, 2, 4)
    X = torch.randn(10, 64)  # 10 samples for 64 inputs
    bw = compress(torch.randn(8, 64), 2 * X.T @ X / 10, 4, 8, damp=0.0)
    assert torch.isfinite(bw.alpha).all() and torch.isfinite(bw.mu).all()
