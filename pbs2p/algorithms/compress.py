"""``compress_weight``: the PBS²P layer compressor every other part of the library calls.

Data-free (``H=None``, what ``quantize_`` uses): ``H = I``, so OBS saliency is the magnitude and there is
nothing to compensate; SPBO runs on the whole matrix at once (vectorized, no column loop).
Calibrated (``H`` given): damped ``H``, ``U = chol(H⁻¹)ᵀ``, then the compensated sweep
(:func:`~pbs2p.algorithms.compensation.compensated_sweep`) and the output-aware refit of ``α, μ``
(:func:`~pbs2p.algorithms.refit.hessian_refit_levels`).

Example:
    >>> import torch
    >>> W, X = torch.randn(16, 64), torch.randn(256, 64)
    >>> bw = compress_weight(W, 2 * X.T @ X / 256, n=4, m=8)
    >>> bw.mask.view(16, 8, 8).sum(-1).unique().tolist(), bw.alpha.shape
    ([4], torch.Size([16, 1]))
"""

from __future__ import annotations

import torch

from ._validate import check_hessian, check_nm, check_weight, resolve_scale_block
from .binarized import BinarizedWeight, dequantize_parts
from .compensation import COMPENSATIONS, METHODS, compensated_sweep
from .hessian import prepare_hessian
from .metrics import output_error_sq
from .refit import hessian_refit_levels
from .spbo import oneshot_select, spbo_select

DEFAULT_COMPENSATION = "column"
DEFAULT_REFINE_ROUNDS = 3
DEFAULT_ORDER = "hessian"
DEFAULT_SWEEPS = 2
ORDERS = ("natural", "hessian")


def group_order(h_diag: torch.Tensor, m: int, scale_block: int) -> torch.Tensor | None:
    """Column permutation visiting whole M-groups by decreasing ``Σ diag H``, inside each scale block.

    GPTQ's act-order at group granularity, so N:M groups and scale blocks stay intact (``None`` when
    scale blocks do not hold whole groups, where no such permutation exists).
    """
    cols = h_diag.numel()
    if scale_block < cols and scale_block % m:
        return None
    gpb = scale_block // m
    g = h_diag.reshape(-1, m).sum(1)
    perm = []
    for b0 in range(0, cols // m, gpb):
        idx = torch.arange(b0, min(b0 + gpb, cols // m), device=h_diag.device)
        idx = idx[torch.argsort(g[idx], descending=True, stable=True)]
        perm.append((idx.unsqueeze(1) * m + torch.arange(m, device=h_diag.device)).reshape(-1))
    return torch.cat(perm)


def compress_weight(
    W: torch.Tensor,
    H: torch.Tensor | None = None,
    *,
    n: int,
    m: int,
    scale_block: int | None = None,
    method: str = "spbo",
    block_size: int = 128,
    compensation: str = DEFAULT_COMPENSATION,
    spbo_steps: int | None = None,
    refine_rounds: int = DEFAULT_REFINE_ROUNDS,
    damp: float = 0.01,
    seed: int = 0,
    order: str = DEFAULT_ORDER,
    sweeps: int = DEFAULT_SWEEPS,
    final_refit: bool = True,
    level_weight: str = "auto",
    reselect_rounds: int = 0,
    lazy_mask: bool = True,
    group_decision: str = "start",
) -> BinarizedWeight:
    """Prune ``W`` to ``n:m`` and binarize the kept weights (PBS²P), returning a :class:`BinarizedWeight`.

    Args:
        W: ``[out, in]`` float weight; ``in % m == 0``.
        H: optional ``[in, in]`` input Hessian ``2XXᵀ/n``; ``None`` = data-free (``H = I``).
        n, m: keep ``n`` of every ``m`` consecutive inputs (``1 <= n < m``).
        scale_block: columns per ``(α, μ)`` pair; ``None`` = one pair per row (default; 64/in bits in fp32,
            so 4:8 costs 11/8 + 64/576 = 1.49 bits/weight at in=576; 128-column blocks cost 1.93).
        method: ``"spbo"`` (progressive, state-dependent pruning) or ``"oneshot"`` (OBS top-n, then fit).
        block_size: columns per compensation block (128 as in the paper).
        compensation: ``"column"`` (GPTQ/SparseGPT, default), ``"block"`` (exact block OBS),
            ``"block-diag"`` (BiLLM's literal update) or ``"none"``; ignored when ``H`` is None.
        spbo_steps: τ, SPBO's prune-and-refit steps (default ``m − n``: one weight per group per step).
        refine_rounds: ARB-style alternating rounds in each binarization fit.
        damp: Hessian damping ``λ = damp·mean(diag H)``.
        seed: kept for API stability; the algorithm is deterministic and uses no randomness.
        order: ``"hessian"`` (default) sweeps whole M-groups by decreasing ``Σ diag H`` inside each scale
            block (GPTQ's act-order at group granularity); ``"natural"`` is the paper's left-to-right.
        sweeps: calibrated mode: after the first sweep and refit, sweep again from the original ``W``
            with the refitted ``α, μ`` fixed (then refit again); a sweep is kept only if it lowers the
            output error. 1 = a single sweep.
        final_refit: least-squares refit of ``α, μ`` under ``H`` after each sweep (calibrated mode).
        level_weight: column weights of the sweep's α/μ fits: ``"auto"`` (OBS per row, √OBS for blocks),
            ``"obs"``, ``"sqrt"``, ``"clipped"``, ``"none"`` (see :mod:`~pbs2p.algorithms.compensation`).
        reselect_rounds: Lloyd re-selection rounds after SPBO (0 = off).
        lazy_mask: in the sweep, re-choose each group's kept set from the compensated values.
        group_decision: ``"start"`` (choose a group's kept set when the sweep reaches it) or
            ``"dynamic"`` (re-score the group's remaining columns after every column's compensation).
    """
    del seed
    check_weight(W)
    out, cols = W.shape
    check_nm(n, m, cols)
    sb = resolve_scale_block(scale_block, cols)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if group_decision not in ("start", "dynamic"):
        raise ValueError(f"group_decision must be 'start' or 'dynamic', got {group_decision!r}")
    if refine_rounds < 0 or reselect_rounds < 0 or sweeps < 1:
        raise ValueError("refine_rounds and reselect_rounds must be >= 0 and sweeps >= 1")
    if spbo_steps is not None and spbo_steps < 1:
        raise ValueError(f"spbo_steps must be >= 1, got {spbo_steps}")
    Wf = W.detach().float()
    if H is None:
        if method == "spbo":
            mask, signs, alpha, mu = spbo_select(Wf, n, m, scale_block=sb, steps=spbo_steps,
                                                 refine_rounds=refine_rounds, reselect_rounds=reselect_rounds)
        else:
            mask, signs, alpha, mu = oneshot_select(Wf, n, m, scale_block=sb, refine_rounds=refine_rounds)
    else:
        check_hessian(H, cols)
        kw = dict(scale_block=sb, method=method, compensation=compensation, block_size=block_size,
                  steps=spbo_steps, refine_rounds=refine_rounds, reselect_rounds=reselect_rounds,
                  lazy_mask=lazy_mask, group_decision=group_decision, level_weight=level_weight)
        mask, signs, alpha, mu = calibrated_sweeps(Wf, H.detach(), n, m, sb, damp=damp, order=order,
                                                   sweeps=sweeps, final_refit=final_refit, **kw)
    return BinarizedWeight(mask=mask, signs=signs, alpha=alpha.float().contiguous(),
                           mu=mu.float().contiguous(), scale_block=sb, n=n, m=m)


def calibrated_sweeps(
    W: torch.Tensor, H: torch.Tensor, n: int, m: int, sb: int, *, damp: float, order: str, sweeps: int,
    final_refit: bool, **kw,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibrated core of :func:`compress_weight`: act-order, sweep(s), refit; ``kw`` go to the sweep."""
    perm = group_order(torch.diagonal(H).float(), m, sb) if order == "hessian" else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    prep = prepare_hessian(H, damp)
    Wr = W.clone()
    Wr[:, prep.dead] = 0.0  # dead inputs: any value is free, the refit ignores them

    def finish(res):
        mask, signs, alpha, mu = res
        if final_refit:
            alpha, mu, err = hessian_refit_levels(Wr, prep.H, mask, signs, alpha, mu, sb, return_error=True)
        else:
            err = output_error_sq(Wr, dequantize_parts(mask, signs, alpha, mu, sb), prep.H)
        return (mask, signs, alpha, mu), err

    best, best_err = finish(compensated_sweep(W, prep, n, m, **kw))
    for _ in range(sweeps - 1):
        cand, err = finish(compensated_sweep(W, prep, n, m, levels=(best[2], best[3]), **kw))
        if err >= best_err:
            break
        best, best_err = cand, err
    mask, signs, alpha, mu = best
    if perm is not None:
        inv = torch.argsort(perm)
        mask, signs = mask[:, inv], signs[:, inv]
    return mask, signs, alpha, mu
