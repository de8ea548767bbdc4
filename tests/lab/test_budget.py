"""The bit-budget allocator: never over budget, exactly optimal within it (brute force on small cases)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbs2p_lab.budget import Candidate, allocate_bits, layer_bits


@st.composite
def instances(draw):
    """2–5 layers, 1–4 candidates each (bits 0..60, errors 0..1), weights 1..12, a target in range."""
    n_layers = draw(st.integers(2, 5))
    weights = draw(st.lists(st.integers(1, 12), min_size=n_layers, max_size=n_layers))
    layers = []
    for _ in range(n_layers):
        k = draw(st.integers(1, 4))
        bits = draw(st.lists(st.integers(0, 60), min_size=k, max_size=k))
        errs = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=k, max_size=k))
        layers.append([Candidate(f"c{j}", b, e) for j, (b, e) in enumerate(zip(bits, errs, strict=True))])
    lo = sum(min(c.bits for c in layer) for layer in layers) / sum(weights) + 1e-9  # float above the cheapest
    hi = sum(max(c.bits for c in layer) for layer in layers) / sum(weights)
    target = draw(st.floats(lo, hi + 1.0, allow_nan=False))
    error_weights = draw(st.none() | st.lists(st.floats(0, 3, allow_nan=False), min_size=n_layers, max_size=n_layers))
    return layers, weights, target, error_weights


def brute_force(layers, weights, target, error_weights):
    """Least objective over every allocation whose total bits fit ``floor(target · Σ w)``."""
    budget = int(Fraction(target) * sum(weights))
    v = error_weights or [1.0] * len(layers)
    best = None
    for combo in itertools.product(*[range(len(layer)) for layer in layers]):
        bits = sum(layers[i][k].bits for i, k in enumerate(combo))
        if bits <= budget:
            obj = sum(v[i] * layers[i][k].error for i, k in enumerate(combo))
            best = obj if best is None else min(best, obj)
    return best


@given(instances())
def test_never_over_budget_and_exactly_optimal(inst):
    layers, weights, target, error_weights = inst
    a = allocate_bits(layers, weights, target, error_weights=error_weights)
    assert a.exact
    # honest count: the chosen settings' bits, summed, over the weights, never above the target
    assert a.total_bits == sum(layers[i][k].bits for i, k in enumerate(a.choices))
    assert Fraction(a.total_bits, sum(weights)) <= Fraction(target)
    assert a.average_bits <= target and a.slack_bits >= 0 and a.slack_per_weight >= -1e-12
    assert a.budget_bits == int(Fraction(target) * sum(weights))
    assert a.labels == tuple(layers[i][k].label for i, k in enumerate(a.choices))
    assert a.objective == pytest.approx(brute_force(layers, weights, target, error_weights), abs=1e-9)


@given(instances())
def test_coarse_fallback_stays_within_budget(inst):
    layers, weights, target, error_weights = inst
    try:
        a = allocate_bits(layers, weights, target, error_weights=error_weights, max_states=3)
    except ValueError as exc:  # the coarse resolution may leave nothing that fits: it must say so
        assert "resolution" in str(exc) or "cheapest" in str(exc)
        return
    assert Fraction(a.total_bits, sum(weights)) <= Fraction(target)
    assert a.objective >= brute_force(layers, weights, target, error_weights) - 1e-9


@given(instances(), st.floats(0, 5, allow_nan=False))
def test_more_budget_never_hurts(inst, extra):
    layers, weights, target, _ = inst
    a = allocate_bits(layers, weights, target)
    b = allocate_bits(layers, weights, target + extra)
    assert b.objective <= a.objective + 1e-12


def test_hits_a_reachable_target_exactly_and_prefers_dense_where_error_is_largest():
    layers = [[Candidate("1bit", 10, e), Candidate("fp16", 160, 0.0)] for e in (0.2, 0.9, 0.5)]
    a = allocate_bits(layers, [10, 10, 10], target_bits=(10 + 160 + 10) / 30)
    assert a.labels == ("1bit", "fp16", "1bit") and a.slack_bits == 0 and a.average_bits == 6.0


def test_refusals_and_layer_bits():
    layers = [[Candidate("a", 10, 0.1)]]
    with pytest.raises(ValueError, match="cheapest"):
        allocate_bits(layers, [10], target_bits=0.5)
    with pytest.raises(ValueError, match="weights_per_layer"):
        allocate_bits(layers, [10, 10], target_bits=2)
    with pytest.raises(ValueError, match="no candidate"):
        allocate_bits([[]], [10], target_bits=2)
    assert layer_bits(1.4861111111111112, 576 * 576) == 576 * 856
    with pytest.raises(ValueError, match="whole number"):
        layer_bits(1.3, 3)
