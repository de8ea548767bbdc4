"""Closed-form binarization of the kept weights with ARB-style alternating refinement (PBS²P §Binarizer).

For every output row and scale block, over the kept set K (``mask``)::

    μ₀ = mean_K W;   B = sign(W − μ);   α = mean_K B·(W − μ) = mean_K |W − μ|;
    then ``rounds`` times:  μ = mean_K (W − α·B);  B = sign(W − μ);  α = mean_K B·(W − μ)

Each update is the exact minimiser of ``Σ_K v·(W − α·B − μ)²`` in one variable with the others fixed,
so the error never increases, and the first step already gives ``err ≤ Σ_K v·(W − μ₀)² ≤ Σ_K v·W²``:
``‖W − Ŵ‖ ≤ ‖W‖`` always holds (pruned entries cost ``w²`` on both sides). Optional per-column
weights ``v`` (e.g. the Hessian diagonal) turn every mean into a ``v``-weighted mean.

Example:
    >>> import torch
    >>> W = torch.randn(3, 8)
    >>> signs, alpha, mu = fit_binary(W, torch.ones(3, 8, dtype=torch.bool), scale_block=8)
    >>> bool((alpha >= 0).all()), alpha.shape
    (True, torch.Size([3, 1]))
"""

from __future__ import annotations

import math

import torch

from .binarized import dequantize_parts


def to_blocks(x: torch.Tensor, scale_block: int, fill: float | bool = 0) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, n_blocks, scale_block]``, padding the last block with ``fill``."""
    out, cols = x.shape
    nb = math.ceil(cols / scale_block)
    pad = nb * scale_block - cols
    if pad:
        x = torch.cat([x, torch.full((out, pad), fill, dtype=x.dtype, device=x.device)], dim=1)
    return x.reshape(out, nb, scale_block)


def from_blocks(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    return x.reshape(x.shape[0], -1)[:, :in_features]


def _col_weight_blocks(col_weight: torch.Tensor | None, scale_block: int, cols: int) -> torch.Tensor | None:
    if col_weight is None:
        return None
    return to_blocks(col_weight.float().reshape(1, cols), scale_block, 0.0)


def fit_values(
    vals: torch.Tensor, weight: torch.Tensor | None = None, *, rounds: int = 3,
    init_mu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core fit on values ``[out, nb, K]``: returns ``(positive [out, nb, K] bool, alpha, mu)``.

    ``weight`` (broadcastable to ``vals``, >= 0) weights every entry; 0 = not in the kept set. A block
    whose weights sum to 0 gets ``alpha = mu = 0``.
    """
    if weight is None:
        inv: torch.Tensor | float = 1.0 / vals.shape[-1]
        live: torch.Tensor | float = 1.0
    else:
        denom = weight.sum(-1).expand(vals.shape[:-1])
        live = (denom > 0).float()
        inv = live / denom.clamp_min(1e-30)

    def wmean(x: torch.Tensor) -> torch.Tensor:
        return (x if weight is None else weight * x).sum(-1) * inv

    def mean_abs(x: torch.Tensor) -> torch.Tensor:  # one fused pass when unweighted
        if weight is None:
            return torch.linalg.vector_norm(x, ord=1, dim=-1) * inv
        return wmean(x.abs())

    def mean_pos(x: torch.Tensor) -> torch.Tensor:
        if weight is None:
            return (x >= 0).sum(-1).float() * inv
        return wmean((x >= 0).float())

    mean_w = wmean(vals)
    mu = mean_w if init_mu is None else init_mu.float().reshape(mean_w.shape).clone()
    centred = vals - mu.unsqueeze(-1)
    alpha = mean_abs(centred)
    for _ in range(rounds):
        mean_b = 2.0 * mean_pos(centred) - live  # mean of B = sign(W − μ)
        mu = mean_w - alpha * mean_b
        centred = vals - mu.unsqueeze(-1)
        alpha = mean_abs(centred)
    return centred >= 0, alpha.clamp_min(0.0), mu


def fit_binary(
    W: torch.Tensor,
    mask: torch.Tensor,
    scale_block: int,
    *,
    rounds: int = 3,
    col_weight: torch.Tensor | None = None,
    init_mu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``signs, alpha, mu`` of a binarized weight for a fixed ``mask``.

    Args:
        W: ``[out, in]`` weights (any float dtype; the math is float32).
        mask: bool ``[out, in]``, the kept set.
        scale_block: columns per scale block (``>= in`` means one ``(α, μ)`` per row).
        rounds: ARB-style alternating refinement rounds after the closed-form start (0 = closed form).
        col_weight: optional non-negative ``[in]`` weights (a diagonal metric), e.g. ``diag(H)``.
        init_mu: optional ``[out, n_blocks]`` start for μ instead of the kept mean. Coordinate descent
            from a previous fit's μ never ends above that fit's error (used by mask re-selection).

    Returns:
        ``signs`` bool ``[out, in]`` (False where not kept), ``alpha`` ``[out, n_blocks]`` (>= 0),
        ``mu`` ``[out, n_blocks]``. Blocks with nothing kept get ``alpha = mu = 0``.
    """
    out, cols = W.shape
    sb = min(scale_block, cols)
    nb = math.ceil(cols / sb)
    if bool(mask.all()) and cols % sb == 0:
        v = None if col_weight is None else col_weight.float().reshape(1, nb, sb)
        pos, alpha, mu = fit_values(W.float().reshape(out, nb, sb), v, rounds=rounds, init_mu=init_mu)
        return pos.reshape(out, cols), alpha, mu
    w = to_blocks(W.float(), sb, 0.0)
    k = to_blocks(mask, sb, False).float()
    v = _col_weight_blocks(col_weight, sb, cols)
    pos, alpha, mu = fit_values(w, k if v is None else k * v, rounds=rounds, init_mu=init_mu)
    signs = from_blocks(pos & (k > 0), cols)
    return signs, alpha, mu


def binarize(
    W: torch.Tensor, mask: torch.Tensor | None = None, scale_block: int | None = None, *, rounds: int = 3
) -> torch.Tensor:
    """Dense fake-quantized ``Ŵ`` of ``W`` binarized over ``mask`` (all kept when ``None``).

    >>> import torch
    >>> W = torch.randn(16, 32)
    >>> bool(torch.linalg.norm(W - binarize(W)) <= torch.linalg.norm(W))
    True
    """
    if mask is None:
        mask = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    sb = W.shape[1] if scale_block is None else min(scale_block, W.shape[1])
    signs, alpha, mu = fit_binary(W, mask, sb, rounds=rounds)
    return dequantize_parts(mask, signs, alpha, mu, sb)
