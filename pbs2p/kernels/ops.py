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

The native operator has three paths (:func:`native_path` says which one a call takes):

* the lookup-table kernels (``"tables"``), below the batches that follow;
* the pair kernels (``"pairs"``): bfloat16 activations from :func:`pair_min_batch` rows (6) on AVX-512 CPUs with
  bf16 dot products, for patterns that keep at most 4 of every 8 columns (N:8 with N <= 4, N:4 with N <= 2) and
  scale blocks of whole 8-column units: bf16 dot products on the kept weights only;
* expand + BLAS (``"blas"``): from :func:`blas_min_batch` rows the operator expands ``W_hat`` to the activations'
  dtype (rounded as the torch path rounds it) and calls the BLAS. float32: from 32 rows with the AVX2 and scalar
  kernels, never with the AVX-512 ones (their tables are faster); bfloat16: from 48 rows on AVX-512 CPUs with
  bf16 dot products where the pair kernels do not apply, never elsewhere.

``PBS2P_PAIR_MIN_BATCH`` and ``PBS2P_BLAS_MIN_BATCH`` (tuning, tests) override the two batches.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import native
from .reference import reference_linear

ENV_VAR = "PBS2P_KERNEL"

#: Accuracy contract of :func:`bsp_linear`, on every path (each native ISA, the pair kernels, the bf16 BLAS path,
#: the torch path), per activation dtype, against ``y_exact``, the product computed in float64 from the stored
#: values (``W_hat`` from the packed codes, ``alpha`` and ``mu``; see :func:`~.reference.exact_linear`)::
#:
#:     |y - y_exact| <= TOLERANCE[x.dtype] * (|x| @ (kept * (|alpha| + |mu|)).T + |bias|)   element-wise
#:
#: The scale on the right (:func:`~.reference.error_scale`) is what a kept weight ``alpha * sign + mu``
#: contributes before the two terms cancel, so the bound holds when ``|mu|`` is close to ``alpha`` (the
#: native path computes ``alpha * (sum of signed x) + mu * (sum of kept x)`` per scale block).
#: float32: sums in fp32 in different orders (observed: below 1e-7 of the scale, K up to 8192). bfloat16 (unit
#: roundoff u = 2^-8): the output is rounded to bf16 once, and ``W_hat`` once on the torch path (computed in fp32
#: first); the native BLAS path and the pair kernels (bf16 prefill) round ``alpha`` and ``mu`` to bf16 before adding
#: them when they are stored in another dtype: three roundings, 3u. The native batch-1 kernel with bf16 tables (N:8
#: on AVX-512 CPUs with bf16 dot products) rounds each group's kept sum and the two half sums of its positive
#: weights to bf16: an error of at most ``u * (|mu - alpha| * sum_kept |x| + 2 |alpha| * sum_pos |x|)``, at most 3u
#: of the scale, plus the output's rounding: 4u = 1.56e-2 at worst. float16 and float64 activations run the torch
#: path (``W_hat`` computed in float32 or float64).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 1e-2, torch.float64: 1e-12}
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


def blas_min_batch(dtype: torch.dtype) -> int | None:
    """Rows from which the native operator multiplies activations of ``dtype`` with the BLAS (``W_hat`` expanded)
    instead of the lookup tables; ``None`` if it never does (or the native operator does not run).

    >>> blas_min_batch(torch.float16) is None  # float16 activations run the torch path
    True
    """
    if dtype not in (torch.float32, torch.bfloat16) or not kernel_backend().startswith("native"):
        return None
    rows = torch.ops.pbs2p._blas_min_batch(dtype == torch.bfloat16)
    return None if rows >= 2**62 else rows


def pair_min_batch() -> int | None:
    """Rows from which bfloat16 activations take the pair kernels where they apply (see :func:`native_path`);
    ``None`` if this CPU and ISA never run them (or the native operator does not run).

    >>> rows = pair_min_batch()
    >>> rows is None or rows >= 1
    True
    """
    if not kernel_backend().startswith("native"):
        return None
    rows = torch.ops.pbs2p._pair_min_batch()
    return None if rows >= 2**62 else rows


def native_path(dtype: torch.dtype, batch: int, n: int, m: int, in_features: int, scale_block: int) -> str:
    """The path :func:`bsp_linear` takes for ``batch`` rows of ``dtype`` activations on an N:M weight of
    ``in_features`` columns and scale blocks of ``scale_block`` columns: ``"tables"`` (lookup tables), ``"pairs"``
    (pair kernels), ``"blas"`` (expand + BLAS) or ``"torch"`` (the torch path).

    >>> native_path(torch.float16, 1, 4, 8, 4096, 4096)  # float16 activations run the torch path
    'torch'
    >>> native_path(torch.float32, 1, 4, 8, 4096, 4096) in ("tables", "torch")
    True
    """
    if _unsupported_problem(dtype, in_features, m, scale_block) or not kernel_backend().startswith("native"):
        return "torch"
    return torch.ops.pbs2p._native_path(dtype == torch.bfloat16, batch, n, m, in_features, scale_block)


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
    return _unsupported_problem(x.dtype, x.shape[-1], m, scale_block)


def _unsupported_problem(dtype: torch.dtype, in_features: int, m: int, scale_block: int) -> str | None:
    """Why the native operator does not handle activations of ``dtype`` on this weight shape (``None`` if it does)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"activations of dtype {dtype}"
    if scale_block < in_features and scale_block % m:
        return f"scale_block {scale_block} not a multiple of M = {m}"
    return None


def _warn_once(reason: str) -> None:
    """Warn that the torch path runs (Python's default warning filter shows each reason once)."""
    if not torch.compiler.is_compiling():
        warnings.warn(f"pbs2p: bsp_linear runs the torch path for {reason}", RuntimeWarning, stacklevel=3)


def check_activations(x: torch.Tensor) -> None:
    """Refuse activations that are not floating point, as ``torch.nn.functional.linear`` on a dense weight does.

    >>> check_activations(torch.ones(2, 8, dtype=torch.int64))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: a linear with a packed PBS2P weight needs floating-point activations, got torch.int64 ...
    """
    if not x.dtype.is_floating_point:
        raise TypeError(f"a linear with a packed PBS2P weight needs floating-point activations, got {x.dtype} (a "
                        "plain nn.Linear refuses them too); convert the input first, e.g. x.float() or x.to(the "
                        "model's dtype)")


def propagate_nonfinite(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The NaN/Inf rule of every path: a row of ``x`` holding NaN or Inf gives NaN in every output of that row,
    a row of the weight whose ``alpha`` or ``mu`` is NaN or Inf gives NaN in its output column.

    Without it the paths differ: a lookup-table kernel skips the pruned weights (so ``0 * Inf`` never
    happens), the dense product does not, and an infinite sum may end as Inf or NaN.
    The native operator applies the same rule in C++; the torch path calls this function.
    """
    rows = torch.isfinite(x).all(-1, keepdim=True)
    columns = torch.isfinite(alpha).all(-1) & torch.isfinite(mu).all(-1)
    return torch.where(rows & columns, y, float("nan"))


def _maybe_nonfinite(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """:func:`propagate_nonfinite` on the torch path, where it can change something (eager: checked with two sums;
    compiled: always). The native operator applies the same rule itself."""
    if torch.compiler.is_compiling():
        return propagate_nonfinite(y, x, alpha, mu)
    if math.isfinite(float(y.detach().sum())) and math.isfinite(float(x.detach().sum())):
        return y
    return propagate_nonfinite(y, x, alpha, mu)


def bsp_linear(
    x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, bias: torch.Tensor | None,
    n: int, m: int, scale_block: int,
) -> torch.Tensor:
    """``y = x @ W_hat.T + bias`` for a packed 1-bit N:M weight (see :mod:`pbs2p.kernels.packing`).

    Within :data:`TOLERANCE` of the exact product on every path; NaN/Inf as :func:`propagate_nonfinite`
    says; integer activations raise ``TypeError``.
    """
    check_activations(x)
    backend = kernel_backend()
    if backend != "torch":
        reason = native_unsupported(x, codes, alpha, mu, bias, m, scale_block)
        if reason is None:
            return torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)  # applies the NaN rule
        _warn_once(reason)
    y = reference_linear(x, codes, alpha, mu, bias, n, m, scale_block)
    return _maybe_nonfinite(y, x, alpha, mu)


def int8_rows_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (scale[:, None] * q).T`` for an int8 matrix ``q`` with one float32 ``scale`` per row, in ``x``'s dtype.

    The native operator ``pbs2p::int8_rows_linear`` runs for float32 and bfloat16 activations on the CPU
    (sums in float32); other calls, and calls that need gradients, run the same product in torch.

    >>> q = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    >>> int8_rows_linear(torch.tensor([[1.0, 1.0]]), q, torch.tensor([0.5, 2.0]))
    tensor([[-0.5000, 14.0000]])
    """
    check_activations(x)
    native_ok = (x.device.type == "cpu" and q.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                 and not (x.requires_grad and torch.is_grad_enabled()))
    if native_ok and kernel_backend() != "torch":
        return torch.ops.pbs2p.int8_rows_linear(x, q, scale)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (torch.nn.functional.linear(x.to(compute), q.to(compute)) * scale.to(compute)).to(x.dtype)
