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

SUM_DTYPES = (torch.float64, torch.float32)


class HessianAccumulator:
    """Running ``2·XᵀX / n`` over batches of inputs (any leading shape): float32 products summed in ``dtype``.

    Whatever the inputs' dtype (bfloat16, float16, float32), each batch's ``XᵀX`` is computed in float32
    and added to a running sum in ``dtype`` (float64 by default; float32 for devices without float64).
    :meth:`all_reduce` sums the accumulators of the ranks of a ``torch.distributed`` group, each fed its
    share of the inputs: the same Hessian as one process fed them all, up to the order of the additions
    (float64 sums of float32 products are exact, so order-free, unless a sum's terms span more than
    about 2^29 in magnitude; the final float32 rounding hides a different last float64 bit unless it sits
    on a float32 rounding boundary).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if dtype not in SUM_DTYPES:
            raise ValueError(f"a Hessian is accumulated in float64 or float32, got {dtype}")
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_samples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += (x.T @ x).to(self.sum.dtype)
        self.n_samples += x.shape[0]

    def all_reduce(self, group=None) -> None:
        """Sum the running sums and sample counts of every rank of ``group`` (a ``torch.distributed``
        process group, ``None``: the default group) into every rank's accumulator."""
        import torch.distributed as dist

        dist.all_reduce(self.sum, group=group)
        count = torch.tensor([self.n_samples], dtype=torch.int64, device=self.sum.device)
        dist.all_reduce(count, group=group)
        self.n_samples = int(count.item())

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
