"""The layer Hessian ``H = 2XXᵀ/n``: accumulate it, damp it, factor ``H⁻¹ = UᵀU``; output errors under it.

``U`` (upper Cholesky factor of ``H⁻¹``) is what GPTQ/SparseGPT sweep with: eliminating columns in order,
``U[j, j]²`` is the OBS denominator of column ``j`` and ``U[j, j:]/U[j, j]`` its compensation direction.
Dead inputs (``H_jj = 0``) get ``H_jj := 1`` and are reported, since their weights never reach the output;
if the Cholesky factorization fails, the damping grows ×10 up to 6 times. Factorization in float64.

Example:
    >>> import torch
    >>> acc = HessianAccumulator(16)
    >>> acc.add(torch.randn(256, 16))
    >>> prep = prepare_hessian(acc.hessian())
    >>> bool(torch.allclose((prep.U.T @ prep.U).double(), torch.linalg.inv(prep.H), atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class HessianAccumulator:
    """Running ``2·XᵀX / n`` over batches: float32 batch products, a float64 running sum.

    >>> import torch
    >>> acc = HessianAccumulator(8)
    >>> acc.add(torch.randn(4, 10, 8)); acc.add(torch.randn(3, 8))
    >>> acc.n_samples, acc.hessian().shape
    (43, torch.Size([8, 8]))
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n_samples = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (any leading shape, any float dtype)."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += (x.T @ x).double()
        self.n_samples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_samples == 0:
            raise ValueError("no calibration inputs reached this layer (the Hessian has no samples)")
        return (2.0 * self.sum / self.n_samples).float()


@dataclass
class PreparedHessian:
    """``H`` damped and repaired (float64), the upper Cholesky factor ``U`` of its inverse (float32)."""

    H: torch.Tensor
    U: torch.Tensor
    dead: torch.Tensor  # bool [in]: inputs that are always zero


def prepare_hessian(H: torch.Tensor, damp: float = 0.01, max_retries: int = 6) -> PreparedHessian:
    """Damp ``H`` by ``damp·mean(diag H)``, invert it, return the upper Cholesky factor of ``H⁻¹``."""
    Hd = H.double().clone()
    Hd = 0.5 * (Hd + Hd.T)
    diag = torch.diagonal(Hd)
    dead = diag <= 0
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    diag[dead] = 1.0
    mean_diag = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag += damp * mean_diag
    eye = torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
    extra = 0.0  # additional damping, as a fraction of mean(diag H)
    for _ in range(max_retries + 1):
        Ht = Hd + (extra * mean_diag) * eye if extra else Hd
        L, info = torch.linalg.cholesky_ex(Ht)
        if int(info) == 0:
            U, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return PreparedHessian(H=Ht, U=U.float(), dead=dead)
        extra = max(damp, 1e-4) if extra == 0.0 else extra * 10.0
    raise ValueError("H is not positive definite even after increasing the damping 10^6-fold")


def output_error_sq(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, i.e. ``(2/n)·‖(W − Ŵ)X‖²_F`` for ``H = 2XᵀX/n`` (float64)."""
    E = W.double() - W_hat.double()
    return float(((E @ H.double()) * E).sum())


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """``‖(W − Ŵ)X‖_F / ‖WX‖_F`` through ``H``; with ``H=None`` the weight-space ``‖W − Ŵ‖/‖W‖``.

    >>> import torch
    >>> W = torch.randn(4, 8)
    >>> relative_output_error(W, torch.zeros(4, 8), torch.eye(8))
    1.0
    """
    if H is None:
        return float(torch.linalg.norm(W.double() - W_hat.double()) / torch.linalg.norm(W.double()))
    den = output_error_sq(W, torch.zeros_like(W), H)
    return (output_error_sq(W, W_hat, H) / den) ** 0.5 if den > 0 else 0.0
