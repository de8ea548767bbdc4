"""BiLLM-style and STBLLM-style baselines (our own implementation from the papers' descriptions).

BiLLM (Huang et al., 2024), per block of 128 columns, on the compensated weights:
1. salient columns by Hessian saliency ``Σ_rows w² / U_jj²``; their count (0..``max_salient``) is searched
   for the lowest weight error of "salient: 2nd-order residual binarization, rest: plain binarization";
2. salient weights: residual binarization ``α₁b₁ + μ₁ + α₂b₂ + μ₂`` per row (2 bits/weight);
3. non-salient weights: split by a searched magnitude threshold ``p`` (one per block) into a concentrated
   ``|w| <= p`` and a sparse ``|w| > p`` group, each binarized per row with its own ``α, μ``;
4. block compensation ``W[:, e:] −= (E / diag U_bb)·U[s:e, e:]`` (BiLLM's, see
   :func:`pbs2p.algorithms.method.sweep`; ``"block"``, ``"column"``-free variants are options).

STBLLM-style: the same, after pruning each block to N:M with the standardized importance
``(|W|/colsum + |W|/rowsum)·‖X_j‖^0.5`` (:func:`stbllm_saliency`); STBLLM
splits non-salient weights in three; we keep BiLLM's two (documented simplification).

Honest bits: 1 sign bit per kept weight, +1 per salient weight (2nd order), +1 group bit per
non-salient kept weight, the N:M index (STBLLM), a salient-column bitmap per block, and 8 scales
(2 × (α, μ) for salient + 2 × (α, μ) for the two groups) per row and block.

Example:
    >>> import torch
    >>> W, X = torch.randn(16, 128), torch.randn(512, 128)
    >>> r = billm(W, 2 * X.T @ X / 512)
    >>> r.W_hat.shape, r.bits_per_weight > r.paper_bits
    (torch.Size([16, 128]), True)
"""

from __future__ import annotations

import torch

from pbs2p.algorithms import BinarizedWeight, prepare_hessian
from pbs2p.algorithms.method import check_weight, fit_binary, top_n
from pbs2p.kernels.packing import check_nm, index_bits

from .baselines import BaselineResult


def stbllm_saliency(W: torch.Tensor, h_diag: torch.Tensor | None, power: float = 0.5) -> torch.Tensor:
    """STBLLM's standardized importance ``(|W|/Σ_rows|W| + |W|/Σ_cols|W|) · ‖X_j‖^power``
    (``h_diag`` = diag of H ∝ ‖X_j‖²; ``None``: activation factor 1)."""
    a = W.float().abs()
    s = a / a.sum(0, keepdim=True).clamp_min(1e-12) + a / a.sum(1, keepdim=True).clamp_min(1e-12)
    if h_diag is not None:
        s = s * h_diag.float().clamp_min(0).sqrt().pow(power).reshape(1, -1)
    return s


def _bin(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row closed-form binarization (μ-centred, α = mean|x − μ|) over ``keep``; 0 elsewhere."""
    signs, alpha, mu = fit_binary(x, keep, x.shape[1], rounds=0)
    return BinarizedWeight(keep, signs, alpha, mu, x.shape[1]).dequantize()


def _residual2(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    q1 = _bin(x, keep)
    return q1 + _bin(x - q1, keep)


def _split_binarize(x: torch.Tensor, keep: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """Two magnitude groups with a searched threshold; each group binarized per row."""
    a = x.abs()
    top = float(a[keep].max()) if bool(keep.any()) else 0.0
    best, best_q = None, _bin(x, keep)
    for i in range(1, n_candidates + 1):
        p = top * i / (n_candidates + 1)
        inner = keep & (a <= p)
        q = _bin(x, inner) + _bin(x, keep & ~inner)
        err = float((x - q)[keep].square().sum())
        if best is None or err < best:
            best, best_q = err, q
    return best_q


def billm_block(
    Wb: torch.Tensor, d: torch.Tensor, keep: torch.Tensor | None = None, *, max_salient: int = 30,
    n_candidates: int = 40,
) -> tuple[torch.Tensor, int]:
    """BiLLM binarization of one column block (no compensation); returns ``(Q, salient_columns)``."""
    out, cols = Wb.shape
    keep = torch.ones_like(Wb, dtype=torch.bool) if keep is None else keep
    sal = ((Wb.square() * keep) / d.square().reshape(1, -1)).sum(0)
    order = torch.argsort(sal, descending=True, stable=True)
    best_k, best_err = 0, None
    for k in range(0, min(max_salient, cols - 1) + 1):
        cs = torch.zeros(cols, dtype=torch.bool, device=Wb.device)
        cs[order[:k]] = True
        s_keep, r_keep = keep & cs, keep & ~cs
        q = _residual2(Wb, s_keep) + _bin(Wb, r_keep)
        err = float((Wb - q).square().sum())
        if best_err is None or err < best_err:
            best_k, best_err = k, err
    cs = torch.zeros(cols, dtype=torch.bool, device=Wb.device)
    cs[order[:best_k]] = True
    q = _residual2(Wb, keep & cs) + _split_binarize(Wb, keep & ~cs, n_candidates)
    return q, best_k


def _sweep(
    W: torch.Tensor, H: torch.Tensor, *, n: int | None, m: int | None, block_size: int, damp: float,
    compensation: str, max_salient: int, n_candidates: int, power: float,
) -> tuple[torch.Tensor, int, int]:
    if compensation not in ("block-diag", "block", "none"):
        raise ValueError(f"compensation must be 'block-diag', 'block' or 'none', got {compensation!r}")
    prep = prepare_hessian(H, damp)
    W = W.float().clone()
    W[:, prep.dead] = 0.0
    U = prep.U
    d = torch.diagonal(U)
    h_diag = torch.diagonal(H).float()
    cols = W.shape[1]
    salient_cols = kept = 0
    for s in range(0, cols, block_size):
        e = min(s + block_size, cols)
        Wb = W[:, s:e]
        keep = None
        if n is not None and m is not None:
            keep = top_n(stbllm_saliency(Wb, h_diag[s:e], power), n, m)
            kept += int(keep.sum())
        else:
            kept += Wb.numel()
        q, k = billm_block(Wb, d[s:e], keep, max_salient=max_salient, n_candidates=n_candidates)
        salient_cols += k
        E = Wb - q
        W[:, s:e] = q
        if e < cols and compensation != "none":
            if compensation == "block":
                Eu = torch.linalg.solve_triangular(U[s:e, s:e], E, upper=True, left=False)
            else:
                Eu = E / d[s:e].unsqueeze(0)
            W[:, e:] -= Eu @ U[s:e, e:]
    return W, salient_cols, kept


def _bits(out: int, cols: int, block_size: int, salient_cols: int, kept: int, n: int | None, m: int | None,
          scale_bits: int) -> tuple[float, float]:
    total = out * cols
    n_blocks = -(-cols // block_size)
    sal_frac = salient_cols / cols
    kept_frac = kept / total
    sign_bits = kept_frac  # one sign per kept weight
    second = kept_frac * sal_frac  # second-order bit for salient weights (approx. for N:M: kept share)
    group = kept_frac * (1 - sal_frac)  # concentrated/sparse membership of non-salient kept weights
    index = index_bits(n, m) / m if n is not None and m is not None else 0.0
    bitmap = cols / total  # salient-column bitmap, one bit per column
    scales = 8 * scale_bits * n_blocks / cols
    honest = sign_bits + second + group + index + bitmap + scales
    paper = sign_bits + second
    return honest, paper


def billm(
    W: torch.Tensor, H: torch.Tensor, *, block_size: int = 128, damp: float = 0.01,
    compensation: str = "block-diag", max_salient: int = 30, n_candidates: int = 40, scale_bits: int = 32,
) -> BaselineResult:
    """BiLLM-style 1-bit baseline (no pruning): salient residual + split non-salient + block compensation."""
    check_weight(W)
    check_weight(H, "H", square=W.shape[1])
    W_hat, sal, kept = _sweep(W, H, n=None, m=None, block_size=block_size, damp=damp,
                              compensation=compensation, max_salient=max_salient, n_candidates=n_candidates,
                              power=0.5)
    honest, paper = _bits(*W.shape, block_size, sal, kept, None, None, scale_bits)
    return BaselineResult("billm", W_hat, honest, paper, {"salient_columns": sal})


def stbllm(
    W: torch.Tensor, H: torch.Tensor, n: int, m: int, *, block_size: int = 128, damp: float = 0.01,
    compensation: str = "block-diag", max_salient: int = 30, n_candidates: int = 40, power: float = 0.5,
    scale_bits: int = 32,
) -> BaselineResult:
    """STBLLM-style: per block, N:M by standardized importance first, then BiLLM binarization of the rest."""
    check_weight(W)
    check_nm(n, m, W.shape[1], packed=False)
    check_weight(H, "H", square=W.shape[1])
    bs = max(m, (block_size // m) * m)
    W_hat, sal, kept = _sweep(W, H, n=n, m=m, block_size=bs, damp=damp, compensation=compensation,
                              max_salient=max_salient, n_candidates=n_candidates, power=power)
    honest, paper = _bits(*W.shape, bs, sal, kept, n, m, scale_bits)
    return BaselineResult(f"stbllm-{n}:{m}", W_hat, honest, paper, {"salient_columns": sal})
