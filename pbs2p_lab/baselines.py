"""Baselines in the same harness as PBS²P: dense fake-quant ``Ŵ`` plus an honest bits/weight count.

Honest bits count every stored bit — signs, masks/indices, salient bitmaps, group bitmaps, scales — over
the number of weights; ``paper_bits`` is the convention of the papers (weight bits only, no metadata).

* :func:`magnitude_nm_sign` — data-free floor: N:M by |w|, ``α·sign(w)`` with α = mean |kept| per row.
* :func:`binarize_dense` — no pruning, PBS²P's binarizer (μ, α, ARB rounds) with the same sweep.
* :func:`pbs2p` — PBS²P (:func:`pbs2p.algorithms.compress`) with any ablation option.
* :func:`sparsegpt_nm` — SparseGPT N:M, kept weights in full precision (fp16 storage assumed).
* :func:`billm` and :func:`stbllm` live in :mod:`~pbs2p_lab.billm`.

Example:
    >>> import torch
    >>> W, X = torch.randn(8, 64), torch.randn(256, 64)
    >>> r = magnitude_nm_sign(W, 4, 8)
    >>> r.name, round(r.bits_per_weight, 3), r.W_hat.shape
    ('magnitude-nm-sign', 1.875, torch.Size([8, 64]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pbs2p.algorithms import compress, prepare_hessian
from pbs2p.algorithms.method import check_weight, top_n
from pbs2p.kernels.packing import check_nm, index_bits


def honest_bits_per_weight(n: int, m: int, in_features: int, scale_block: int | None = None, *,
                           scale_bits: int = 32, scales_per_block: int = 2) -> float:
    """Every stored bit over the number of weights of an N:M binarized layer (the packed format's count,
    without row-tile padding): per M-group the kept-set index and ``n`` signs, per row and scale block
    ``scales_per_block`` values of ``scale_bits``.

    >>> round(honest_bits_per_weight(4, 8, 576), 4)  # 11/8 + 64/576
    1.4861
    """
    sb = in_features if scale_block is None else min(scale_block, in_features)
    return (index_bits(n, m) + n) / m + math.ceil(in_features / sb) * scales_per_block * scale_bits / in_features


@dataclass
class BaselineResult:
    """A dense fake-quantized weight and what storing it honestly costs."""

    name: str
    W_hat: torch.Tensor
    bits_per_weight: float  # every stored bit / number of weights
    paper_bits: float  # the papers' convention: weight bits only
    details: dict = field(default_factory=dict)


def magnitude_nm_sign(W: torch.Tensor, n: int, m: int, *, scale_bits: int = 32) -> BaselineResult:
    """Keep the ``n`` largest |w| of each group of ``m``; ``Ŵ = α_row · sign(w)`` on the kept set."""
    check_weight(W)
    check_nm(n, m, W.shape[1], packed=False)
    w = W.float()
    mask = top_n(w.abs(), n, m)
    alpha = (w.abs() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    W_hat = torch.where(mask, alpha * torch.where(w >= 0, 1.0, -1.0), torch.zeros((), device=w.device))
    bits = honest_bits_per_weight(n, m, W.shape[1], scale_bits=scale_bits, scales_per_block=1)
    return BaselineResult("magnitude-nm-sign", W_hat, bits, n / m, {"mask": mask})


def binarize_dense(
    W: torch.Tensor, H: torch.Tensor | None = None, *, scale_block: int | None = None, scale_bits: int = 32,
    **options,
) -> BaselineResult:
    """Binarization without pruning (every weight ``α·b + μ``) with PBS²P's binarizer, sweep and refit.

    The same :func:`pbs2p.algorithms.compress` (``options``: compensation, extras, ...) with every
    "group" a single always-kept column, so the comparison isolates pruning.
    """
    bw = compress(W, H, 1, 1, scale_block=scale_block, **options)
    bits = honest_bits_per_weight(1, 1, W.shape[1], bw.scale_block, scale_bits=scale_bits)
    return BaselineResult("binarize-dense", bw.dequantize(), bits, 1.0)


def pbs2p(W: torch.Tensor, H: torch.Tensor | None, n: int, m: int, *, scale_bits: int = 32,
          **options) -> BaselineResult:
    """PBS²P through :func:`pbs2p.algorithms.compress`; ``options`` are its keyword options (ablations)."""
    bw = compress(W, H, n, m, **options)
    name = "pbs2p-oneshot" if options.get("spbo_steps") == 0 else "pbs2p-spbo"
    bits = honest_bits_per_weight(n, m, W.shape[1], bw.scale_block, scale_bits=scale_bits)
    return BaselineResult(name, bw.dequantize(), bits, n / m, {"weight": bw})


def sparsegpt_nm(
    W: torch.Tensor, H: torch.Tensor, n: int, m: int, *, block_size: int = 128, damp: float = 0.01,
    value_bits: int = 16,
) -> BaselineResult:
    """SparseGPT with N:M: lazy per-group OBS selection ``w²/U_jj²``, OBS compensation, kept weights kept.

    Bits: ``(ceil(log2 C(m,n)) + n·value_bits) / m``.
    """
    check_weight(W)
    cols = W.shape[1]
    check_nm(n, m, cols, packed=False)
    check_weight(H, "H", square=cols)
    prep = prepare_hessian(H, damp)
    W = W.float().clone()
    W[:, prep.dead] = 0.0
    U = prep.U
    d = torch.diagonal(U)
    bs = max(m, (block_size // m) * m)
    for s in range(0, cols, bs):
        e = min(s + bs, cols)
        Err = torch.zeros(W.shape[0], e - s, device=W.device)
        for j in range(s, e):
            if (j - s) % m == 0:
                keep = top_n(W[:, j:j + m].square() / d[j:j + m].square(), n, m)
            q = torch.where(keep[:, (j - s) % m], W[:, j], torch.zeros((), device=W.device))
            err = (W[:, j] - q) / d[j]
            W[:, j] = q
            W[:, j + 1:e] -= err.unsqueeze(1) * U[j, j + 1:e].unsqueeze(0)
            Err[:, j - s] = err
        W[:, e:] -= Err @ U[s:e, e:]
    bits = (index_bits(n, m) + n * value_bits) / m
    return BaselineResult("sparsegpt-nm", W, bits, n * value_bits / m)
