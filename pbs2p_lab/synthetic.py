"""Synthetic layers with LLM-like statistics, for tests and layer-level benchmarks.

Weights: Gaussian or heavy-tailed (Student-t), with per-row scale spread. Inputs ``X`` [samples, in]:
per-channel log-normal scales, a low-rank shared factor (correlated channels), per-channel means, a
few outlier channels (×``outlier_scale``) and optionally "massive activations" (a couple of channels that
are huge on a few tokens only, as in late ``down_proj`` inputs of real LLMs).

Example:
    >>> W, X = synthetic_layer(32, 64, seed=0)
    >>> W.shape, X.shape
    (torch.Size([32, 64]), torch.Size([256, 64]))
"""

from __future__ import annotations

import torch


def synthetic_weight(out: int, cols: int, *, dist: str = "gaussian", df: float = 3.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``[out, cols]`` weights: ``"gaussian"`` or ``"student"`` (t with ``df`` dof), row scales spread."""
    if dist == "gaussian":
        W = torch.randn(out, cols, generator=generator)
    elif dist == "student":
        z = torch.randn(out, cols, generator=generator)
        chi2 = torch.randn(out, cols, int(df), generator=generator).square().sum(-1)
        W = z / (chi2 / df).sqrt()
    else:
        raise ValueError(f"dist must be 'gaussian' or 'student', got {dist!r}")
    row = torch.exp(0.3 * torch.randn(out, 1, generator=generator))
    return 0.02 * W * row


def synthetic_inputs(samples: int, cols: int, *, rank: int = 8, corr: float = 0.7, outliers: int = 2,
                     outlier_scale: float = 20.0, massive: int = 0, massive_scale: float = 300.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``[samples, cols]`` activations with correlated, offset, outlier and optionally massive channels."""
    g = generator
    scales = torch.exp(0.5 * torch.randn(cols, generator=g))
    F = torch.randn(samples, rank, generator=g) @ torch.randn(rank, cols, generator=g) / rank**0.5
    X = ((1 - corr) ** 0.5 * torch.randn(samples, cols, generator=g) + corr**0.5 * F) * scales
    X = X + 0.3 * torch.randn(cols, generator=g) * scales
    if outliers:
        idx = torch.randperm(cols, generator=g)[:outliers]
        X[:, idx] *= outlier_scale
    if massive:
        ch = torch.randperm(cols, generator=g)[:massive]
        tok = torch.randperm(samples, generator=g)[: max(1, samples // 128)]
        X[tok.unsqueeze(1), ch.unsqueeze(0)] = massive_scale * scales[ch]
    return X


def synthetic_layer(out: int, cols: int, *, samples: int = 256, dist: str = "gaussian", seed: int = 0,
                    **input_kw: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, X)`` for one layer, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    W = synthetic_weight(out, cols, dist=dist, generator=g)
    X = synthetic_inputs(samples, cols, generator=g, **input_kw)
    return W, X
