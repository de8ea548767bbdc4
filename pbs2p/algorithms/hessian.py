"""A layer's Hessian ``H = 2XXᵀ/n`` accumulated from its inputs, and output errors measured through it.

Example:
    >>> import torch
    >>> acc = HessianAccumulator(16)
    >>> acc.add(torch.randn(4, 64, 16))
    >>> W = torch.randn(8, 16)
    >>> acc.n_samples, relative_output_error(W, 0.5 * W, acc.hessian())
    (256, 0.5)
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running ``2·XᵀX / n`` over batches of inputs (any leading shape): float32 products, float64 sum."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n_samples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += (x.T @ x).double()
        self.n_samples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_samples == 0:
            raise ValueError("no calibration inputs reached this layer (the Hessian has no samples)")
        return (2.0 * self.sum / self.n_samples).float()


def output_error_sq(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, i.e. ``(2/n)·‖(W − Ŵ)X‖²_F`` for ``H = 2XᵀX/n`` (float64)."""
    E = W.double() - W_hat.double()
    return float(((E @ H.double()) * E).sum())


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """``‖(W − Ŵ)X‖_F / ‖WX‖_F`` through ``H``; with ``H=None`` the weight-space ``‖W − Ŵ‖/‖W‖``."""
    if H is None:
        return float(torch.linalg.norm(W.double() - W_hat.double()) / torch.linalg.norm(W.double()))
    den = output_error_sq(W, torch.zeros_like(W), H)
    return (output_error_sq(W, W_hat, H) / den) ** 0.5 if den > 0 else 0.0
