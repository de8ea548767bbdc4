"""N:M masks from scores: keep the ``n`` highest-scoring of every ``m`` consecutive inputs of a row.

Example:
    >>> import torch
    >>> mask = nm_mask_from_scores(torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0, 0.0, 1.0, 4.0]]), n=2, m=4)
    >>> mask.int().tolist()
    [[0, 1, 1, 0, 1, 0, 0, 1]]
    >>> is_nm(mask, 2, 4)
    True
"""

from __future__ import annotations

import torch


def group_view(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[out, in]`` → ``[out, in/m, m]`` (no copy)."""
    out, cols = x.shape
    if cols % m:
        raise ValueError(f"in_features ({cols}) must be a multiple of m ({m})")
    return x.reshape(out, cols // m, m)


def nm_mask_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping exactly the ``n`` largest scores of every group of ``m`` (ties: deterministic).

    ``-inf`` scores are allowed (never kept unless a group has fewer than ``n`` finite scores); NaN is not.
    """
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m, got n={n}, m={m}")
    g = group_view(scores, m)
    if n == m:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = torch.topk(g, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(scores.shape)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has exactly ``n`` True."""
    if mask.dim() != 2 or mask.shape[1] % m:
        return False
    return bool((group_view(mask, m).sum(-1) == n).all())
