"""Element scores used to pick which weights to keep (higher = more important).

* :func:`obs_saliency` — PBS²P's fine search (CFS fine) and SparseGPT: ``s = w² / [U]_cc²`` with ``U`` the
  upper Cholesky factor of ``H⁻¹`` (``[U]_cc²`` is the OBS denominator in the column sweep order).
* :func:`magnitude_saliency` — the data-free case (``H = I`` makes OBS exactly this).
* :func:`stbllm_saliency` — STBLLM's standardized importance,
  ``(|W|/colsum|W| + |W|/rowsum|W|) · ‖X_j‖^0.5`` with ``‖X_j‖`` from ``diag(XXᵀ)``.

Example:
    >>> import torch
    >>> W = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    >>> obs_saliency(W, torch.tensor([1.0, 2.0])).tolist()
    [[1.0, 1.0], [0.25, 0.015625]]
"""

from __future__ import annotations

import torch


def magnitude_saliency(W: torch.Tensor) -> torch.Tensor:
    """``w²`` (float32)."""
    return W.float().square()


def obs_saliency(W: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    """``w² / d²`` with ``d = diag(U)`` of the upper Cholesky factor of ``H⁻¹`` (shape ``[in]``)."""
    return W.float().square() / u_diag.float().square().reshape(1, -1)


def stbllm_saliency(W: torch.Tensor, h_diag: torch.Tensor | None, power: float = 0.5) -> torch.Tensor:
    """STBLLM score ``(|W|/Σ_rows|W| + |W|/Σ_cols|W|) · ‖X_j‖^power`` (``h_diag`` = diag of H ∝ ‖X_j‖²).

    With ``h_diag=None`` the activation factor is 1.
    """
    a = W.float().abs()
    col = a.sum(0, keepdim=True).clamp_min(1e-12)
    row = a.sum(1, keepdim=True).clamp_min(1e-12)
    s = a / col + a / row
    if h_diag is not None:
        s = s * h_diag.float().clamp_min(0).sqrt().pow(power).reshape(1, -1)
    return s
