"""Input checks shared by every entry point of :mod:`pbs2p.algorithms`.

All errors are ``ValueError`` with a message that names the offending argument, so a caller
(``quantize_``, the calibration pipeline) can surface it unchanged.
"""

from __future__ import annotations

import torch


def check_weight(W: torch.Tensor, name: str = "W") -> None:
    """Raise ``ValueError`` unless ``W`` is a finite 2-D floating-point tensor."""
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_hessian(H: torch.Tensor, in_features: int) -> None:
    """Raise ``ValueError`` unless ``H`` is a finite, square ``[in, in]`` floating-point tensor."""
    if not isinstance(H, torch.Tensor):
        raise ValueError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square 2-D tensor [in, in], got shape {tuple(H.shape)}")
    if H.shape[0] != in_features:
        raise ValueError(f"H has shape {tuple(H.shape)} but W has in_features={in_features}")
    if not H.is_floating_point():
        raise ValueError(f"H must be a floating-point tensor, got dtype {H.dtype}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H contains NaN or Inf values")


def check_nm(n: int, m: int, in_features: int | None = None, *, allow_dense: bool = False) -> None:
    """Raise ``ValueError`` unless ``1 <= n < m`` (``n <= m`` with ``allow_dense``) and ``m | in``."""
    if not isinstance(n, int) or not isinstance(m, int) or isinstance(n, bool) or isinstance(m, bool):
        raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
    if m < 2:
        raise ValueError(f"m must be >= 2, got m={m}")
    upper_ok = n <= m if allow_dense else n < m
    if n < 1 or not upper_ok:
        bound = "n <= m" if allow_dense else "n < m"
        raise ValueError(f"N:M sparsity needs 1 <= n and {bound}, got n={n}, m={m}")
    if in_features is not None and in_features % m != 0:
        raise ValueError(
            f"in_features ({in_features}) must be a multiple of m ({m}) for {n}:{m} sparsity"
        )


def resolve_scale_block(scale_block: int | None, in_features: int) -> int:
    """Return the effective scale block (``None`` or anything >= ``in`` means one block per row)."""
    if scale_block is None:
        return in_features
    if isinstance(scale_block, bool) or not isinstance(scale_block, int) or scale_block < 1:
        raise ValueError(f"scale_block must be a positive integer or None, got {scale_block!r}")
    return min(scale_block, in_features)
