"""CFS coarse allocation: per-layer N with an exact weighted average."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbs2p.algorithms.cfs import allocate_n, average_kept_fraction, layer_importance

SIZES = [576 * 576, 576 * 192, 576 * 1536, 64 * 64, 96 * 128]


@given(cos=st.lists(st.floats(0.02, 1.0), min_size=1, max_size=40), data=st.data())
def test_equal_layers_hit_target_exactly(cos, data):
    m = data.draw(st.sampled_from([4, 8, 16]))
    lo = data.draw(st.integers(1, m - 1))
    hi = data.draw(st.integers(lo, m - 1))
    target = data.draw(st.integers(lo, hi))
    normalize = data.draw(st.sampled_from(["mean", "median"]))
    N = allocate_n(cos, target, m, lo, hi, [1000] * len(cos), normalize=normalize)
    assert all(lo <= x <= hi for x in N)
    assert sum(N) == target * len(cos)


@given(cos=st.lists(st.floats(0.02, 1.0), min_size=1, max_size=30), data=st.data())
def test_mixed_sizes_exact_or_raise(cos, data):
    sizes = [data.draw(st.sampled_from(SIZES)) for _ in cos]
    lo, hi, target = 2, 6, data.draw(st.integers(2, 6))
    normalize = data.draw(st.sampled_from(["mean", "median"]))
    try:
        N = allocate_n(cos, target, 8, lo, hi, sizes, normalize=normalize)
    except ValueError:
        return
    assert all(lo <= x <= hi for x in N)
    assert sum(w * x for w, x in zip(sizes, N, strict=True)) == target * sum(sizes)
    assert average_kept_fraction(N, 8, sizes) == target / 8


@given(cos=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4),
       sizes=st.lists(st.integers(1, 7), min_size=4, max_size=4), target=st.integers(1, 4))
def test_finds_a_solution_whenever_one_exists(cos, sizes, target):
    sizes = sizes[: len(cos)]
    lo, hi = 1, 4
    exists = any(sum(w * x for w, x in zip(sizes, c, strict=True)) == target * sum(sizes)
                 for c in itertools.product(range(lo, hi + 1), repeat=len(cos)))
    if exists:
        N = allocate_n(cos, target, 8, lo, hi, sizes)
        assert sum(w * x for w, x in zip(sizes, N, strict=True)) == target * sum(sizes)
    else:
        with pytest.raises(ValueError):
            allocate_n(cos, target, 8, lo, hi, sizes)


def test_more_important_layers_keep_more():
    N = allocate_n([0.3, 0.6, 0.9, 0.99], 4, 8, 2, 6)
    assert sorted(N, reverse=True) == N and N[0] > N[-1]
    imp = layer_importance([0.5, 1.0])
    assert imp[0] == pytest.approx(2 * imp[1]) and sum(imp) == pytest.approx(2)


def test_importance_kind_and_errors():
    assert allocate_n([1.0, 1.0], 4, 8, 2, 6, kind="importance") == [4, 4]
    with pytest.raises(ValueError, match="outside"):
        allocate_n([0.5, 0.9], 7, 8, 2, 6)
    with pytest.raises(ValueError, match="n_low"):
        allocate_n([0.5, 0.9], 4, 8, 6, 2)
    with pytest.raises(ValueError, match="entries"):
        allocate_n([0.5, 0.9], 4, 8, 2, 6, [1])
    with pytest.raises(ValueError):
        allocate_n([float("nan")], 4, 8, 2, 6)


def test_median_normalization_resists_a_near_zero_cosine():
    """SmolLM2-like cosines: block 0 ≈ 0 (embeddings → hidden states), the rest ≈ 0.95.

    With the mean, every other block's ideal N falls below N_low, so the exact-average correction decides
    alone, and it goes by importance (never by block order); with the median, the block that changes its
    input most gets N_high and the most redundant one N_low."""
    cos = [0.006, 0.83, 0.96, 0.97, 0.95, 0.975, 0.74, 0.96]
    by_mean = allocate_n(cos, 6, 8, 5, 7)
    assert by_mean == [7, 7, 5, 5, 7, 5, 7, 5]  # the four lowest cosines keep 7
    by_median = allocate_n(cos, 6, 8, 5, 7, normalize="median")
    assert sum(by_median) == 6 * len(cos)
    assert by_median[0] == 7 and by_median[6] == 7 and by_median[5] == 5
    with pytest.raises(ValueError, match="normalize"):
        layer_importance([0.5], normalize="max")


@settings(max_examples=300)
@given(imp=st.lists(st.floats(0.1, 3.0), min_size=2, max_size=5), data=st.data())
def test_allocation_is_the_cheapest_exact_one(imp, data):
    """Against brute force: among all allocations within the bounds that hit the target exactly, none is
    closer to the ideal ``N·I`` (in ``Σ|N·I − N_l|``) than the one returned."""
    sizes = [data.draw(st.sampled_from([1, 2, 3])) for _ in imp]
    lo, hi, target = 2, 6, data.draw(st.integers(2, 6))
    ideal = [target * x for x in imp]
    exact = [c for c in itertools.product(range(lo, hi + 1), repeat=len(imp))
             if sum(w * x for w, x in zip(sizes, c, strict=True)) == target * sum(sizes)]
    N = allocate_n(imp, target, 8, lo, hi, sizes, kind="importance")
    assert tuple(N) in exact

    def cost(c):
        return sum(abs(a - b) for a, b in zip(ideal, c, strict=True))

    assert cost(N) == pytest.approx(min(cost(c) for c in exact), abs=1e-9)


def test_importance_values():
    """``I = (1/c) / mean(1/c)``, or over the median of ``1/c``; cosines ≤ 0 count as ``eps``."""
    assert layer_importance([0.5, 0.25]) == pytest.approx([2 / 3, 4 / 3])
    assert layer_importance([0.5, 0.25, 0.2], normalize="median") == pytest.approx([0.5, 1.0, 1.25])
    assert layer_importance([-1.0, 0.5], eps=0.25) == pytest.approx([4 / 3, 2 / 3])


@pytest.mark.parametrize(("call", "match"), [
    (lambda: layer_importance([]), "at least one layer"),
    (lambda: layer_importance([0.5, float("inf")]), "must be finite"),
    (lambda: allocate_n([1.0, -0.5], 4, 8, 2, 6, kind="importance"), "finite and >= 0"),
    (lambda: allocate_n([1.0, float("nan")], 4, 8, 2, 6, kind="importance"), "finite and >= 0"),
    (lambda: allocate_n([], 4, 8, 2, 6, kind="importance"), "finite and >= 0"),
    (lambda: allocate_n([0.5], 4, 8, 2, 6, kind="cos"), "kind must be"),
    (lambda: allocate_n([0.5], 4, 8, 2, 9), "n_high"),
    (lambda: allocate_n([0.5], 4, 8, 0, 6), "n_low"),
    (lambda: allocate_n([0.5, 0.9], 4, 8, 2, 6, [1, 0]), "positive"),
    (lambda: allocate_n([0.5, 0.9], 4.5, 8, 2, 6, [1, 2]), "not an integer"),
    (lambda: allocate_n([0.5, 0.9], 1, 8, 2, 6), "outside"),
    (lambda: allocate_n([0.5, 0.9], 6.5, 8, 2, 6), "outside"),
    (lambda: allocate_n([1.0, 1.0], 4.5, 8, 1, 7, [2, 4], kind="importance"), "gcd"),
])
def test_refusals_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_allocation_at_the_bounds_and_on_target():
    """A layer exactly on its ideal N needs no correction; the full range [1, m] is allowed; equal-cost
    steps down go to the less important layer first."""
    assert allocate_n([1.0, 1.0, 1.0], 3, 8, 1, 8, kind="importance") == [3, 3, 3]
    assert allocate_n([2.0, 0.5], 4, 8, 1, 8, kind="importance") == [7, 1]
    assert allocate_n([1.0], 8, 8, 1, 8, kind="importance") == [8]


def test_average_kept_fraction():
    assert average_kept_fraction([3, 5], 8) == 0.5
    assert average_kept_fraction([3, 5], 8, [3, 1]) == pytest.approx(14 / 32)
    with pytest.raises(ValueError):
        average_kept_fraction([3, 5], 8, [1])
