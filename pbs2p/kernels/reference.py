"""The plain-torch compute path (reference and fallback), and the exact result the accuracy contract is stated against.

:func:`reference_linear` is what :func:`~pbs2p.kernels.ops.bsp_linear` runs where the native operator
does not. :func:`exact_linear` and :func:`error_scale` define its accuracy contract
(:data:`~pbs2p.kernels.ops.TOLERANCE`): every path is compared to the float64 product of the stored
values, never to another path.

Example (``Ŵ = [[0.5, -1.5, 0, 0]]``: α = 1, μ = −0.5, two of four kept):
    >>> import torch
    >>> from pbs2p.kernels import packing
    >>> codes = packing.pack(torch.tensor([[True, True, False, False]]), torch.tensor([[True, False, False, False]]),
    ...                      2, 4)
    >>> alpha, mu, x = torch.tensor([[1.0]]), torch.tensor([[-0.5]]), torch.ones(1, 4)
    >>> exact_linear(x, codes, alpha, mu, None, 2, 4, 4), error_scale(x, codes, alpha, mu, None, 2, 4, 4)
    (tensor([[-1.]], dtype=torch.float64), tensor([[3.]], dtype=torch.float64))
"""

from __future__ import annotations

import torch

from .packing import dequantize, expand_scales, unpack_ternary


def reference_linear(
    x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, bias: torch.Tensor | None,
    n: int, m: int, scale_block: int,
) -> torch.Tensor:
    """``x @ W_hat.T + bias`` in ``x.dtype``; compiles with ``fullgraph=True``.

    ``W_hat = alpha * sign + mu`` is computed in float32 at least (float64 for float64 activations), and
    only then rounded to ``x.dtype``: rounding ``alpha`` and ``mu`` to bfloat16 first would lose
    ``W_hat`` entirely where ``mu`` is close to ``-alpha`` or ``alpha``.

    >>> import torch
    >>> from pbs2p.kernels import packing
    >>> codes = packing.pack(torch.tensor([[True, True, False, False]]), torch.tensor([[True, False, False, False]]),
    ...                      2, 4)
    >>> alpha, mu = torch.tensor([[1.0]]), torch.tensor([[-0.999]])
    >>> x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)  # reads W_hat[0, 0] = 1 - 0.999
    >>> reference_linear(x, codes, alpha, mu, None, 2, 4, 4)
    tensor([[0.0010]], dtype=torch.bfloat16)
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    weight = dequantize(codes, alpha, mu, n, m, scale_block, dtype=compute).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def exact_linear(
    x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, bias: torch.Tensor | None,
    n: int, m: int, scale_block: int,
) -> torch.Tensor:
    """The product the accuracy contract refers to: ``x @ W_hat.T + bias`` in float64, from the stored values
    (example in the module docstring)."""
    weight = dequantize(codes, alpha.double(), mu.double(), n, m, scale_block, dtype=torch.float64)
    y = x.double() @ weight.T
    return y if bias is None else y + bias.double()


def error_scale(
    x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, bias: torch.Tensor | None,
    n: int, m: int, scale_block: int,
) -> torch.Tensor:
    """``|x| @ (kept * (|alpha| + |mu|)).T + |bias|`` in float64: the scale of the contract's error bound
    (example in the module docstring)."""
    kept = unpack_ternary(codes, n, m, alpha.shape[0]).ne(0).double()
    magnitude = expand_scales(alpha.double().abs() + mu.double().abs(), scale_block, kept.shape[1]) * kept
    scale = x.double().abs() @ magnitude.T
    return scale if bias is None else scale + bias.double().abs()


def contract_ratio(
    y: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
    bias: torch.Tensor | None, n: int, m: int, scale_block: int, tolerance: float,
) -> float:
    """Largest ``|y - y_exact| / (tolerance * scale)``: the contract holds iff it is <= 1 (``inf`` for a NaN or Inf
    output where the exact result is finite).

    >>> import torch
    >>> from pbs2p.kernels import packing
    >>> codes = packing.pack(torch.tensor([[True, True, False, False]]), torch.tensor([[True, False, False, False]]),
    ...                      2, 4)
    >>> args = (torch.ones(1, 4), codes, torch.tensor([[1.0]]), torch.tensor([[-0.5]]), None, 2, 4, 4)
    >>> contract_ratio(torch.tensor([[-1.0]]), *args, tolerance=1e-6)
    0.0
    """
    exact = exact_linear(x, codes, alpha, mu, bias, n, m, scale_block)
    if exact.numel() == 0:
        return 0.0
    bound = tolerance * error_scale(x, codes, alpha, mu, bias, n, m, scale_block)
    error = (y.double() - exact).abs().nan_to_num(nan=float("inf"))
    ratio = torch.where(error == 0, torch.zeros_like(error), error / bound)
    return float(ratio.max())
