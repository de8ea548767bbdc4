"""The plain-torch compute path: unpack the packed weight and multiply (reference and fallback)."""

from __future__ import annotations

import torch

from .packing import dequantize


def reference_linear(
    x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, bias: torch.Tensor | None,
    n: int, m: int, scale_block: int,
) -> torch.Tensor:
    """``x @ W_hat.T + bias`` with ``W_hat`` unpacked in ``x.dtype``; compiles with ``fullgraph=True``."""
    weight = dequantize(codes, alpha, mu, n, m, scale_block, dtype=x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
