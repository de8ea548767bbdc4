"""Bit-budget allocation: each layer's setting chosen to minimise measured error under an honest bit budget.

CFS coarse (:mod:`~pbs2p.algorithms.allocation`) gives each layer an N from a proxy (the cosine of its
block's input and output) and keeps the average N fixed. This generalises it: every layer ``l`` has a
list of candidate settings — N:M patterns, other scale layouts, or left dense at 16/32 bits — each with its
**measured** error ``e_lk`` and its **honest** storage ``b_lk`` (every stored bit of the layer: signs,
kept-set indices, scales; an integer), and we solve the multiple-choice knapsack::

    minimise  Σ_l  v_l · e_l,k(l)     subject to   Σ_l b_l,k(l)  <=  B = floor(target · Σ_l w_l)

with ``w_l`` the layer's number of weights and ``v_l`` optional error weights (default 1: the summed error).

What "hits the target exactly" means here: a real-valued target (bits per weight) is in general not
reachable by any combination of discrete settings. The allocation returned (i) never exceeds the budget —
its honest average ``Σ b / Σ w`` is ``<= target`` — and (ii) is **exactly optimal over that feasible set**:
no other choice of settings within the budget has a lower objective (dynamic program over the total bits in
units of the gcd of all candidate bit counts, so no rounding). The unused budget is reported as
``slack_bits`` (and per weight). Ties in the objective go to the allocation that uses fewer bits. When the
program would need more than ``max_states`` states, costs are rounded **up** to a coarser unit (the result
is still within budget, ``exact=False``).

Example:
    >>> layers = [[Candidate("4:8", 11, 0.30), Candidate("fp16", 128, 0.0)],
    ...           [Candidate("4:8", 11, 0.50), Candidate("fp16", 128, 0.0)]]
    >>> a = allocate_bits(layers, weights_per_layer=[8, 8], target_bits=9.0)
    >>> a.labels, a.total_bits, a.budget_bits, a.slack_bits, a.exact
    (('4:8', 'fp16'), 139, 144, 5, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["BitAllocation", "Candidate", "allocate_bits", "layer_bits"]


@dataclass(frozen=True)
class Candidate:
    """One setting of one layer: a label, its honest storage in bits (whole layer), its measured error."""

    label: str
    bits: int
    error: float


@dataclass(frozen=True)
class BitAllocation:
    """The chosen setting of every layer and how the budget was used."""

    choices: tuple[int, ...]  # index into each layer's candidate list
    labels: tuple[str, ...]
    total_bits: int  # Σ honest bits of the chosen settings
    budget_bits: int  # floor(target · Σ weights)
    total_weights: int
    target_bits: float  # requested average bits per weight
    objective: float  # Σ v_l · e_l of the chosen settings
    exact: bool  # True: optimal over every allocation within the budget

    @property
    def average_bits(self) -> float:
        """Honest average bits per weight of the allocation (``<= target_bits``)."""
        return self.total_bits / self.total_weights

    @property
    def slack_bits(self) -> int:
        """Budget left unused, in bits (``>= 0``)."""
        return self.budget_bits - self.total_bits

    @property
    def slack_per_weight(self) -> float:
        """``target_bits − average_bits``."""
        return self.target_bits - self.average_bits


def layer_bits(bits_per_weight: float, weights: int, tol: float = 1e-6) -> int:
    """A layer's total stored bits from its bits/weight; ``ValueError`` unless it is a whole number."""
    total = bits_per_weight * weights
    rounded = round(total)
    if abs(total - rounded) > tol * max(1.0, abs(total)):
        raise ValueError(f"{bits_per_weight} bits/weight × {weights} weights = {total} is not a whole number of bits")
    return int(rounded)


def _validate(
    candidates: Sequence[Sequence[Candidate]],
    weights: Sequence[int],
    target: float,
    error_weights: Sequence[float] | None,
) -> list[float]:
    if not candidates:
        raise ValueError("need at least one layer")
    if len(weights) != len(candidates):
        raise ValueError(f"weights_per_layer has {len(weights)} entries for {len(candidates)} layers")
    if any(int(w) != w or w <= 0 for w in weights):
        raise ValueError("weights_per_layer must be positive integers")
    for i, layer in enumerate(candidates):
        if not layer:
            raise ValueError(f"layer {i} has no candidate setting")
        for c in layer:
            if int(c.bits) != c.bits or c.bits < 0:
                raise ValueError(f"layer {i}, {c.label!r}: bits must be a non-negative integer, got {c.bits}")
            if not math.isfinite(c.error):
                raise ValueError(f"layer {i}, {c.label!r}: error must be finite, got {c.error}")
    if not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target_bits must be finite and >= 0, got {target}")
    v = [1.0] * len(candidates) if error_weights is None else [float(x) for x in error_weights]
    if len(v) != len(candidates) or any(not math.isfinite(x) or x < 0 for x in v):
        raise ValueError("error_weights must be one finite value >= 0 per layer")
    return v


def allocate_bits(
    candidates: Sequence[Sequence[Candidate]],
    weights_per_layer: Sequence[int],
    target_bits: float,
    *,
    error_weights: Sequence[float] | None = None,
    max_states: int = 1_000_000,
) -> BitAllocation:
    """Choose one candidate per layer: minimum ``Σ v_l·e_l`` with honest average bits ``<= target_bits``.

    Args:
        candidates: per layer, its settings (:class:`Candidate`: total stored bits and measured error).
        weights_per_layer: number of weights of each layer (the average is per weight).
        target_bits: requested average bits per weight over all the layers.
        error_weights: ``v_l`` per layer (default all 1).
        max_states: budget units the dynamic program may use; above it costs are rounded up (inexact).

    Raises ``ValueError`` if even the cheapest setting of every layer exceeds the budget.
    """
    v = _validate(candidates, weights_per_layer, target_bits, error_weights)
    total_w = sum(int(w) for w in weights_per_layer)
    budget = math.floor(Fraction(target_bits) * total_w)  # exact rational arithmetic on the float target
    cheapest = sum(min(c.bits for c in layer) for layer in candidates)
    if cheapest > budget:
        raise ValueError(
            f"target {target_bits} bits/weight is below the cheapest allocation ({cheapest / total_w:.6f})"
        )
    unit = 0
    for layer in candidates:
        for c in layer:
            unit = math.gcd(unit, int(c.bits))
    unit = max(unit, 1)
    exact = budget // unit <= max_states
    if not exact:
        unit = -(-budget // max_states)
    cap = budget // unit
    cost = [[-(-int(c.bits) // unit) for c in layer] for layer in candidates]  # ceil: never over budget
    val = [[v[i] * c.error for c in layer] for i, layer in enumerate(candidates)]

    # dp[c] = least objective of the layers so far with total cost <= c units (monotone in c)
    dp = np.zeros(cap + 1)
    most = max(len(layer) for layer in candidates)
    dtype = np.int8 if most < 2**7 else np.int16 if most < 2**15 else np.int32
    choice = np.zeros((len(candidates), cap + 1), dtype=dtype)
    for i in range(len(candidates)):
        new = np.full(cap + 1, np.inf)
        for k, (ck, ek) in enumerate(zip(cost[i], val[i], strict=True)):
            if ck > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[ck:] = dp[: cap + 1 - ck] + ek
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = k
        dp = new
    best = dp[cap]
    if not math.isfinite(best):
        raise ValueError(f"no allocation fits the budget at a resolution of {unit} bits; raise max_states")
    # fewest bits among the optimal allocations: the smallest capacity reaching the optimum
    c = int(np.flatnonzero(dp <= best)[0])
    picks = [0] * len(candidates)
    for i in range(len(candidates) - 1, -1, -1):
        k = int(choice[i, c])
        picks[i] = k
        c -= cost[i][k]
    chosen = [layer[k] for layer, k in zip(candidates, picks, strict=True)]
    return BitAllocation(
        choices=tuple(picks),
        labels=tuple(c.label for c in chosen),
        total_bits=sum(int(c.bits) for c in chosen),
        budget_bits=int(budget),
        total_weights=total_w,
        target_bits=float(target_bits),
        objective=float(sum(v[i] * c.error for i, c in enumerate(chosen))),
        exact=exact,
    )
