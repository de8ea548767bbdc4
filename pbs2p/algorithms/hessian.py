"""Layer Hessian utilities: accumulate ``H = 2XXᵀ/n``, damp it, invert it, factor ``H⁻¹ = UᵀU``.

The upper Cholesky factor ``U`` of ``H⁻¹`` is what GPTQ/SparseGPT sweep with: eliminating columns in
order, the inverse Hessian of the still-free columns ``j:`` is ``U[j:, j:]ᵀ U[j:, j:]``, so ``U[j, j]²`` is
the OBS denominator of column ``j`` and ``U[j, j:]/U[j, j]`` its optimal compensation direction.

Robustness (calibration data of real LLMs has both):
* dead inputs (``H_jj = 0``, e.g. a channel that is always zero): ``H_jj := 1`` and the column is
  reported in ``dead`` — any weight there has no effect on the output;
* singular or badly conditioned ``H``: damping ``λ = damp · mean(diag H)`` on the diagonal, and if the
  Cholesky still fails, ``λ`` grows ×10 up to 6 times (then ``ValueError``).
The factorization runs in float64; ``U`` is returned in float32.

Example:
    >>> import torch
    >>> X = torch.randn(256, 16)
    >>> H = hessian_from_inputs(X)
    >>> prep = prepare_hessian(H)
    >>> U = prep.U
    >>> Hinv = torch.linalg.inv(prep.H.double())
    >>> bool(torch.allclose((U.T @ U).double(), Hinv, atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def hessian_from_inputs(X: torch.Tensor) -> torch.Tensor:
    """``H = 2·XᵀX / n_samples`` for layer inputs ``X`` of shape ``[n_samples, in]`` (float32 result)."""
    if X.dim() != 2:
        raise ValueError(f"X must be [n_samples, in_features], got shape {tuple(X.shape)}")
    Xd = X.double()
    return (2.0 * Xd.T @ Xd / X.shape[0]).float()


class HessianAccumulator:
    """Running ``2·XᵀX / n`` over batches (float32 batch products, float64 running sum).

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
        """Add the rows of ``x`` (any leading shape): ``XᵀX`` of the batch in float32, summed in float64.

        A float32 product per batch is as accurate as the activations it is computed from and runs at
        about twice the float64 speed; the running sum stays float64 so many batches do not drift.
        """
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += (x.T @ x).double()
        self.n_samples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_samples == 0:
            raise ValueError("no samples were added to the HessianAccumulator")
        return (2.0 * self.sum / self.n_samples).float()


@dataclass
class PreparedHessian:
    """``H`` damped and repaired, its float64 inverse's upper Cholesky factor ``U`` (float32), extras."""

    H: torch.Tensor  # float64 [in, in], dead diagonals set to 1, damping added
    U: torch.Tensor  # float32 [in, in], upper triangular, H⁻¹ = UᵀU
    dead: torch.Tensor  # bool [in]
    damp_used: float  # λ / mean(diag H) actually applied


def damp_hessian(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 copy of ``H`` with dead diagonals set to 1 and ``λ = damp·mean(diag)`` added.

    Returns ``(H_damped, dead)``.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    Hd = H.double().clone()
    Hd = 0.5 * (Hd + Hd.T)
    diag = torch.diagonal(Hd)
    dead = diag <= 0
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    diag[dead] = 1.0
    mean_diag = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag += damp * mean_diag
    return Hd, dead


def prepare_hessian(H: torch.Tensor, damp: float = 0.01, max_retries: int = 6) -> PreparedHessian:
    """Damp ``H``, invert it and return the upper Cholesky factor of ``H⁻¹`` (retrying with more damping)."""
    Hd, dead = damp_hessian(H, damp)
    live = ~dead
    diag0 = torch.diagonal(H.double())
    mean_diag = float(diag0[live].mean()) if bool(live.any()) else 1.0
    eye = torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
    extra = 0.0  # additional damping, as a fraction of mean(diag H)
    for _ in range(max_retries + 1):
        Ht = Hd + (extra * mean_diag) * eye if extra else Hd
        L, info = torch.linalg.cholesky_ex(Ht)
        if int(info) == 0:
            U, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return PreparedHessian(H=Ht, U=U.float(), dead=dead, damp_used=damp + extra)
        extra = max(damp, 1e-4) if extra == 0.0 else extra * 10.0
    raise ValueError("H is not positive definite even after increasing the damping 10^6-fold")

