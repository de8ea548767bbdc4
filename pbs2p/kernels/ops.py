"""Entry point of the compute on packed weights: picks the native CPU operator or the torch path.

:func:`bsp_linear` runs the native operator ``torch.ops.pbs2p.bsp_linear`` (see :mod:`.native`) when
:func:`kernel_backend` names a native backend and the call is one it handles; otherwise it runs
:func:`~pbs2p.kernels.reference.reference_linear`, the compile-able torch path. Calls the native
operator does not handle (and that therefore run the torch path, with a one-time warning):

* tensors not on the CPU, activations that are not float32 or bfloat16;
* per-block scales whose ``scale_block`` is not a multiple of ``m``.

The native operator has an autograd formula (plain torch ops, see :mod:`.native`), so calls with
inputs that require grad also run it.

The environment variable ``PBS2P_KERNEL`` selects the backend:

* ``auto`` (default): the native operator with the best ISA of this CPU, the torch path (after a
  warning) where it cannot be built;
* ``native``: the same, but a failed build raises;
* ``avx512``, ``avx2``, ``scalar``: the native operator with that ISA; raises if unavailable;
* ``torch``: always the torch path.

``PBS2P_BLAS_MIN_BATCH`` (tuning, tests) overrides the batch from which bfloat16 activations take
the expand-to-bf16 + BLAS path of the native operator (default 48, AVX-512 CPUs with bf16 dot
products only); below it, and for float32 activations at every batch, the lookup-table kernels run.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import native
from .reference import reference_linear

ENV_VAR = "PBS2P_KERNEL"

#: Accuracy contract of the native operator against :func:`reference_linear`, per activation dtype:
#: ``|y - y_ref| <= TOLERANCE[x.dtype] * (|x| @ |W_hat|.T + |bias|)`` element-wise (``W_hat`` in fp32).
#: float32: both sum in fp32, in different orders (the native path adds subset sums read from tables
#: and applies alpha and mu once per scale block), so they differ by a few fp32 roundings of that
#: scale. bfloat16: the reference rounds alpha, mu and every ``W_hat`` value to bf16 (2^-9 relative)
#: and its output to bf16; the native path keeps ``W_hat`` exact in fp32 and rounds only the output.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
CHOICES = ("auto", "native", "torch", "avx512", "avx2", "scalar")


def _requested() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in CHOICES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(CHOICES)}")
    return mode


@torch.compiler.assume_constant_result
def kernel_backend() -> str:
    """Name of the compute path :func:`bsp_linear` uses: ``"native-avx512"``, ``"native-avx2"``,
    ``"native-scalar"`` or ``"torch"``. Builds the native operator on first use.

    >>> kernel_backend() in ("native-avx512", "native-avx2", "native-scalar", "torch")
    True
    """
    mode = _requested()
    if mode == "torch":
        return "torch"
    if not native.load():
        if mode != "auto":
            raise RuntimeError(f"{ENV_VAR}={mode} but the native kernels could not be built")
        return "torch"
    if mode in ("avx512", "avx2", "scalar") and native.isa() != mode:
        native.set_isa(mode)
    return f"native-{native.isa()}"


def native_unsupported(
    x: torch.Tensor,
    codes: torch.Tensor,
    alpha: torch.Tensor,
    mu: torch.Tensor,
    bias: torch.Tensor | None,
    m: int,
    scale_block: int,
) -> str | None:
    """Why the native operator does not handle this call (``None`` if it does)."""
    tensors = (x, alpha, mu) if bias is None else (x, alpha, mu, bias)
    if any(t.device.type != "cpu" for t in (codes, *tensors)):
        return "tensors not on the CPU"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"activations of dtype {x.dtype}"
    if scale_block < x.shape[-1] and scale_block % m:
        return f"scale_block {scale_block} not a multiple of M = {m}"
    return None


def _warn_once(reason: str) -> None:
    """Warn that the torch path runs (Python's default warning filter shows each reason once)."""
    if not torch.compiler.is_compiling():
        warnings.warn(f"pbs2p: bsp_linear runs the torch path for {reason}", RuntimeWarning, stacklevel=3)


def bsp_linear(
    x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, bias: torch.Tensor | None,
    n: int, m: int, scale_block: int,
) -> torch.Tensor:
    """``y = x @ W_hat.T + bias`` for a packed 1-bit N:M weight (see :mod:`pbs2p.kernels.packing`)."""
    if kernel_backend() != "torch":
        reason = native_unsupported(x, codes, alpha, mu, bias, m, scale_block)
        if reason is None:
            return torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
        _warn_once(reason)
    return reference_linear(x, codes, alpha, mu, bias, n, m, scale_block)
