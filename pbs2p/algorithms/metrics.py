"""Layer-level error metrics.

Example:
    >>> import torch
    >>> W, X = torch.randn(4, 8), torch.randn(32, 8)
    >>> H = 2 * X.T @ X / 32
    >>> round(relative_output_error(W, torch.zeros(4, 8), H), 6)
    1.0
"""

from __future__ import annotations

import torch


def output_error_sq(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` = ``(2/n)·‖(W − Ŵ)X‖²_F`` for ``H = 2XᵀX/n`` (float64 math)."""
    E = (W.double() - W_hat.double())
    return float(((E @ H.double()) * E).sum())


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """``‖(W − Ŵ)X‖_F / ‖WX‖_F`` via ``H ∝ XXᵀ``; with ``H=None`` the weight-space ``‖W − Ŵ‖/‖W‖``."""
    if H is None:
        return float(torch.linalg.norm(W.double() - W_hat.double()) / torch.linalg.norm(W.double()))
    den = output_error_sq(W, torch.zeros_like(W), H)
    return (output_error_sq(W, W_hat, H) / den) ** 0.5 if den > 0 else 0.0
