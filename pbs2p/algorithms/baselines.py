"""Baselines in the same harness as PBS²P: dense fake-quant ``Ŵ`` plus an honest bits/weight count.

Honest bits count every stored bit — signs, masks/indices, salient bitmaps, group bitmaps, scales — over
the number of weights; ``paper_bits`` is the convention of the papers (weight bits only, no metadata).

* :func:`magnitude_nm_sign` — data-free floor: N:M by |w|, ``α·sign(w)`` with α = mean |kept| per row.
* :func:`binarize_dense` — no pruning, PBS²P's binarizer (μ, α, ARB rounds) with the same sweep.
* :func:`pbs2p` — PBS²P (:func:`~pbs2p.algorithms.compress.compress_weight`) with any ablation option.
* :func:`sparsegpt_nm` — SparseGPT N:M, kept weights in full precision (fp16 storage assumed).
* :func:`billm` and :func:`stbllm` live in :mod:`~pbs2p.algorithms.billm`.

Example:
    >>> import torch
    >>> W, X = torch.randn(8, 64), torch.randn(256, 64)
    >>> r = magnitude_nm_sign(W, 4, 8)
    >>> r.name, round(r.bits_per_weight, 3), r.W_hat.shape
    ('magnitude-nm-sign', 1.875, torch.Size([8, 64]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._validate import check_hessian, check_nm, check_weight, resolve_scale_block
from .binarize import fit_binary
from .binarized import dequantize_parts, honest_bits_per_weight, nm_index_bits
from .compress import calibrated_sweeps, compress_weight
from .hessian import prepare_hessian
from .nm_mask import nm_mask_from_scores


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
    check_nm(n, m, W.shape[1])
    w = W.float()
    mask = nm_mask_from_scores(w.abs(), n, m)
    alpha = (w.abs() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    W_hat = torch.where(mask, alpha * torch.where(w >= 0, 1.0, -1.0), torch.zeros((), device=w.device))
    bits = honest_bits_per_weight(n, m, W.shape[1], scale_bits=scale_bits, scales_per_block=1)
    return BaselineResult("magnitude-nm-sign", W_hat, bits, n / m, {"mask": mask})


def binarize_dense(
    W: torch.Tensor, H: torch.Tensor | None = None, *, scale_block: int | None = None,
    compensation: str = "column", block_size: int = 128, refine_rounds: int = 3, damp: float = 0.01,
    order: str = "hessian", sweeps: int = 2, final_refit: bool = True, scale_bits: int = 32,
) -> BaselineResult:
    """Binarization without pruning (every weight ``α·b + μ``) with PBS²P's binarizer, sweep and refit.

    Same machinery as :func:`~pbs2p.algorithms.compress.compress_weight` (act-order, sweeps, refit),
    with every "group" a single always-kept column, so the comparison isolates pruning.
    """
    check_weight(W)
    cols = W.shape[1]
    sb = resolve_scale_block(scale_block, cols)
    Wf = W.float()
    if H is None:
        full = torch.ones_like(Wf, dtype=torch.bool)
        signs, alpha, mu = fit_binary(Wf, full, sb, rounds=refine_rounds)
        W_hat = dequantize_parts(full, signs, alpha, mu, sb)
    else:
        check_hessian(H, cols)
        mask, signs, alpha, mu = calibrated_sweeps(
            Wf, H.detach(), 1, 1, sb, damp=damp, order=order, sweeps=sweeps, final_refit=final_refit,
            scale_block=sb, method="spbo", compensation=compensation, block_size=block_size, steps=None,
            refine_rounds=refine_rounds, reselect_rounds=0, lazy_mask=True, group_decision="start",
            level_weight="auto",
        )
        W_hat = dequantize_parts(mask, signs, alpha, mu, sb)
    bits = honest_bits_per_weight(1, 1, cols, sb, scale_bits=scale_bits)
    return BaselineResult("binarize-dense", W_hat, bits, 1.0)


def pbs2p(W: torch.Tensor, H: torch.Tensor | None, n: int, m: int, *, scale_bits: int = 32,
          **options) -> BaselineResult:
    """PBS²P through :func:`compress_weight`; ``options`` are its keyword options (ablations)."""
    bw = compress_weight(W, H, n=n, m=m, **options)
    name = f"pbs2p-{options.get('method', 'spbo')}"
    return BaselineResult(name, bw.dequantize(), bw.bits_per_weight(scale_bits=scale_bits), n / m,
                          {"weight": bw})


def sparsegpt_nm(
    W: torch.Tensor, H: torch.Tensor, n: int, m: int, *, block_size: int = 128, damp: float = 0.01,
    value_bits: int = 16,
) -> BaselineResult:
    """SparseGPT with N:M: lazy per-group OBS selection ``w²/U_jj²``, OBS compensation, kept weights kept.

    Bits: ``(ceil(log2 C(m,n)) + n·value_bits) / m``.
    """
    check_weight(W)
    cols = W.shape[1]
    check_nm(n, m, cols)
    check_hessian(H, cols)
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
                keep = nm_mask_from_scores(W[:, j:j + m].square() / d[j:j + m].square(), n, m)
            q = torch.where(keep[:, (j - s) % m], W[:, j], torch.zeros((), device=W.device))
            err = (W[:, j] - q) / d[j]
            W[:, j] = q
            W[:, j + 1:e] -= err.unsqueeze(1) * U[j, j + 1:e].unsqueeze(0)
            Err[:, j - s] = err
        W[:, e:] -= Err @ U[s:e, e:]
    bits = (nm_index_bits(n, m) + n * value_bits) / m
    return BaselineResult("sparsegpt-nm", W, bits, n * value_bits / m)
