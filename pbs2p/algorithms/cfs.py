"""CFS coarse search: how many weights per M-group each layer keeps (PBS²P §CFS).

Layer importance from the cosine similarity ``c_l`` between a decoder layer's input and output hidden
states (a layer that barely changes its input is redundant)::

    I_l = (1/c_l) / mean_k(1/c_k);    N_l = clip(round(N_target · I_l), N_low, N_high)

then the rounding is corrected so that the average kept fraction, weighted by each layer's number of
weights, is **exactly** ``N_target / M``: ``Σ_l w_l·N_l = N_target·Σ_l w_l``. The correction is the
cheapest (in ``Σ_l |N_target·I_l − N_l|``) set of ±1 steps that hits the target exactly, found by a small
dynamic program over the distinct layer sizes; ``ValueError`` if no integer solution within the bounds
exists (e.g. the target is outside ``[N_low, N_high]`` or the sizes' gcd does not divide the deficit).

Ties (steps of equal cost, compared to 9 decimals so that float noise never decides) go to importance:
a more important layer gets a +1 step first and a −1 step last; only layers of exactly equal importance
and size are ordered by position. The allocation therefore follows any permutation of the layers.

Example:
    >>> allocate_n([0.5, 0.9, 0.95, 0.3], n_target=4, m=8, n_low=2, n_high=6)  # low cosine = important
    [5, 3, 2, 6]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

_MAX_STATES = 2_000_000


NORMALIZATIONS = ("mean", "median")


def layer_importance(cosine: Sequence[float], eps: float = 1e-3, normalize: str = "mean") -> list[float]:
    """``I_l = (1/c_l) / mean_k(1/c_k)``; similarities are clamped to ``>= eps`` (≤ 0 = most important).

    ``normalize="median"`` divides by the median of ``1/c_k`` instead: one block with ``c ≈ 0`` (SmolLM2's
    first block has ``c = 0.006``: it turns embeddings into hidden states) makes the mean ≈ 6× every other
    block's ``1/c``, so with ``"mean"`` every other block's ideal ``N·I_l`` falls below ``N_low`` and
    which blocks get more weights is decided by the exact-average correction alone (ties, i.e. block
    order). The median keeps a typical block at ``I ≈ 1``.
    """
    if len(cosine) == 0:
        raise ValueError("need at least one layer")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    inv = []
    for c in cosine:
        if not math.isfinite(c):
            raise ValueError(f"cosine similarity must be finite, got {c}")
        inv.append(1.0 / max(float(c), eps))
    ref = sum(inv) / len(inv) if normalize == "mean" else statistics.median(inv)
    return [x / ref for x in inv]


def _step_costs(ideal: float, start: int, lo: int, hi: int, direction: int) -> list[float]:
    """Marginal costs |ideal − N| of moving one step at a time from ``start`` towards a bound."""
    costs, cur = [], start
    while lo <= cur + direction <= hi:
        costs.append(abs(ideal - (cur + direction)) - abs(ideal - cur))
        cur += direction
    return costs


def allocate_n(
    scores: Sequence[float],
    n_target: float,
    m: int,
    n_low: int,
    n_high: int,
    weights_per_layer: Sequence[int] | None = None,
    *,
    kind: str = "cosine",
    normalize: str = "mean",
) -> list[int]:
    """Per-layer ``N_l`` (keep ``N_l`` of every ``m``) whose weighted mean is exactly ``n_target``.

    Args:
        scores: per-layer cosine similarities (``kind="cosine"``) or importances ``I_l`` (``"importance"``).
        n_target: target average N (may be fractional if the weighted total is an integer).
        m: group size; bounds must satisfy ``1 <= n_low <= n_high <= m``.
        n_low, n_high: per-layer bounds.
        weights_per_layer: number of weights of each layer (default: all equal).
        kind: what ``scores`` are.
        normalize: ``"mean"`` or ``"median"`` normalisation of the cosine importances
            (:func:`layer_importance`).
    """
    if kind == "cosine":
        imp = layer_importance(scores, normalize=normalize)
    elif kind == "importance":
        imp = [float(s) for s in scores]
        if not imp or any(not math.isfinite(x) or x < 0 for x in imp):
            raise ValueError("importances must be finite and >= 0")
    else:
        raise ValueError(f"kind must be 'cosine' or 'importance', got {kind!r}")
    L = len(imp)
    if not 1 <= n_low <= n_high <= m:
        raise ValueError(f"need 1 <= n_low <= n_high <= m, got n_low={n_low}, n_high={n_high}, m={m}")
    w = [1] * L if weights_per_layer is None else [int(x) for x in weights_per_layer]
    if len(w) != L:
        raise ValueError(f"weights_per_layer has {len(w)} entries for {L} layers")
    if any(x <= 0 for x in w):
        raise ValueError("weights_per_layer must be positive")
    total_w = sum(w)
    target = n_target * total_w
    T = round(target)
    if abs(target - T) > 1e-6 * max(1.0, abs(target)):
        raise ValueError(f"n_target={n_target} × {total_w} weights is not an integer number of kept weights")
    if not n_low * total_w <= T <= n_high * total_w:
        raise ValueError(f"n_target={n_target} is outside [n_low={n_low}, n_high={n_high}]")

    ideal = [n_target * x for x in imp]
    N = [min(n_high, max(n_low, math.floor(x + 0.5))) for x in ideal]
    deficit = T - sum(wi * ni for wi, ni in zip(w, N, strict=True))
    if deficit == 0:
        return N
    g = 0
    for x in w:
        g = math.gcd(g, x)
    if deficit % g:
        raise ValueError(
            "no integer allocation hits the target exactly (the layer sizes' gcd does not divide it)"
        )

    # group layers by size; within a size class the cheapest k steps are a greedy prefix (convex costs)
    classes: dict[int, list[int]] = {}
    for i, x in enumerate(w):
        classes.setdefault(x // g, []).append(i)
    plans = []  # per class: {k: (cost, [(layer, direction), ...])}
    for u, layers in sorted(classes.items()):
        options: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
        for direction in (1, -1):
            steps = []
            for i in layers:
                for s, c in enumerate(_step_costs(ideal[i], N[i], n_low, n_high, direction)):
                    steps.append((round(c, 9), -direction * imp[i], i, s))
            steps.sort()
            acc, chosen = 0.0, []
            for k, (c, _, i, _) in enumerate(steps, start=1):
                acc += c
                chosen.append(i)
                options[direction * k] = (acc, list(chosen))
        plans.append((u, options))

    # DP over classes: state = sum of u·k so far (in units of g)
    best: dict[int, tuple[float, list[tuple[int, int]]]] = {0: (0.0, [])}
    need = deficit // g
    for ci, (u, options) in enumerate(plans):
        new: dict[int, tuple[float, list[tuple[int, int]]]] = {}
        for s, (cost, hist) in best.items():
            for k, (c, _) in options.items():
                key = s + u * k
                val = cost + c
                if key not in new or val < new[key][0] - 1e-12:
                    new[key] = (val, hist + [(ci, k)])
        if len(new) > _MAX_STATES:
            raise ValueError("allocation search too large; use fewer distinct layer sizes")
        best = new
    if need not in best:
        raise ValueError("no allocation within [n_low, n_high] hits the target average exactly")
    for ci, k in best[need][1]:
        direction = 1 if k > 0 else -1
        for i in plans[ci][1][k][1]:
            N[i] += direction
    return N


def average_kept_fraction(N: Sequence[int], m: int, weights_per_layer: Sequence[int] | None = None) -> float:
    """``Σ w_l N_l / (m Σ w_l)``."""
    w = [1] * len(N) if weights_per_layer is None else list(weights_per_layer)
    return sum(a * b for a, b in zip(w, N, strict=True)) / (m * sum(w))
