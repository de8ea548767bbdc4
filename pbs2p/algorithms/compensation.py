"""GPTQ-style sweep over column blocks: select, binarize, push the error onto later columns.

Columns are processed in blocks of ``block_size`` (128 in the paper). With ``U`` the upper Cholesky factor
of ``H⁻¹`` (see :mod:`~pbs2p.algorithms.hessian`) and ``E`` the error of a processed block:

* ``"column"`` (GPTQ / SparseGPT): inside a block, column by column,
  ``err_j = (w_j − ŵ_j)/U_jj``; ``W[:, j+1:e] −= err_j ⊗ U[j, j+1:e]``; after the block,
  ``W[:, e:] −= Err · U[s:e, e:]``. Each group's mask is (re)chosen when the sweep reaches it, from the
  compensated values (SparseGPT's lazy N:M selection).
* ``"block"`` (BiLLM / ARB-LLM: no update inside a block) with the *exact* block OBS update
  ``W[:, e:] −= (E · U_bb⁻¹) · U[s:e, e:]``.
* ``"block-diag"``: BiLLM's literal update ``W[:, e:] −= (E / diag U_bb) · U[s:e, e:]`` (an approximation
  of the above that ignores the correlations inside the block).
* ``"none"``: no compensation (the selection still uses the Hessian through the column weights).

How α, μ interact with compensation: the ``(α, μ)`` of a scale block are fitted (by SPBO or one-shot)
when the sweep reaches the block's first column, on the *current* (compensated) values of all its columns
— BiLLM's choice when ``scale_block == block_size``, and for per-row scales the fit on the original ``W``.
They then stay fixed while the block's columns are binarized, because the error already pushed onward was
computed with them; this is GPTQ's rule for its grid. The sweep's signs and masks are therefore decided
with slightly stale scales, which the final output-aware least-squares refit
(:func:`~pbs2p.algorithms.refit.hessian_refit_levels`) repairs exactly for the chosen masks and signs
(and :func:`~pbs2p.algorithms.compress.compress_weight`'s ``sweeps`` re-runs the sweep with those).

Selection inside the sweep (``lazy_mask``): when the sweep reaches a group, its kept set is re-chosen
from the compensated values — for SPBO by the state-dependent cost ``Δ_j = v_j·[w_j² − (|w_j − μ| − α)²]``
with the block's current ``α, μ``, for one-shot by OBS saliency ``v_j·w_j²`` — with ``v_j = 1/U_jj²``.
The α/μ fits on arrival weight columns by ``level_weight`` (OBS ``v``, or ``√v`` for sub-row blocks, where
one massive-activation channel would otherwise dictate its block's levels).

Example:
    >>> import torch
    >>> from pbs2p.algorithms.hessian import prepare_hessian
    >>> W, X = torch.randn(8, 32), torch.randn(128, 32)
    >>> prep = prepare_hessian(2 * X.T @ X / 128)
    >>> mask, signs, alpha, mu = compensated_sweep(W, prep, 2, 4, scale_block=32, block_size=16)
    >>> mask.view(8, 8, 4).sum(-1).unique().tolist()
    [2]
"""

from __future__ import annotations

import math

import torch

from .hessian import PreparedHessian
from .nm_mask import nm_mask_from_scores
from .spbo import oneshot_select, prune_delta, spbo_select

COMPENSATIONS = ("column", "block", "block-diag", "none")
METHODS = ("spbo", "oneshot")


def _select_scores(
    w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, sb: int, v: torch.Tensor, method: str
) -> torch.Tensor:
    if method == "spbo":
        return prune_delta(w, alpha, mu, sb, v)
    return w.float().square() * v.reshape(1, -1)


def _quantize(
    w: torch.Tensor, keep: torch.Tensor, a: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarize columns ``w`` with per-column levels ``a, u`` (broadcastable), zero where not kept."""
    pos = w >= u
    q = torch.where(pos, u + a, u - a)
    return torch.where(keep, q, torch.zeros_like(q)), pos & keep


LEVEL_WEIGHTS = ("auto", "obs", "none", "clipped", "sqrt")


def _level_weights(v: torch.Tensor, kind: str, per_row: bool) -> torch.Tensor | None:
    """Column weights of the α/μ fits: the OBS weights, none, OBS clipped at 10× their median, or √OBS.

    ``"auto"``: OBS for per-row scales, √OBS for sub-row scale blocks. Measured: with per-row scales the
    full OBS weights fit best (also on layers with massive activations); with 128-column blocks a
    massive channel dominates its block's fit under OBS weights (one synthetic layer: 0.44 vs 0.29
    relative error with √OBS), while √OBS is as good on average.
    """
    if kind == "auto":
        kind = "obs" if per_row else "sqrt"
    if kind == "obs":
        return v
    if kind == "none":
        return None
    if kind == "clipped":
        return v.clamp_max(10.0 * float(v.median()))
    if kind == "sqrt":
        return v.sqrt()
    raise ValueError(f"level_weight must be one of {LEVEL_WEIGHTS}, got {kind!r}")


def compensated_sweep(
    W: torch.Tensor,
    prep: PreparedHessian,
    n: int,
    m: int,
    *,
    scale_block: int,
    method: str = "spbo",
    compensation: str = "column",
    block_size: int = 128,
    steps: int | None = None,
    refine_rounds: int = 3,
    reselect_rounds: int = 0,
    lazy_mask: bool = True,
    group_decision: str = "start",
    levels: tuple[torch.Tensor, torch.Tensor] | None = None,
    level_weight: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sweep ``W`` left to right in ``block_size`` blocks; return ``mask, signs, alpha, mu``.

    ``method`` picks the selection ("spbo": progressive Δ-based, "oneshot": OBS saliency top-n);
    column weights ``v = 1/U_jj²`` (the OBS denominators) enter both selection and the level fit.
    ``lazy_mask`` re-chooses every group's kept set from the compensated values when the sweep reaches
    it (with the block's fixed levels); otherwise the mask from the block's arrival fit is used.
    """
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out, cols = W.shape
    sb = min(scale_block, cols)
    nb = math.ceil(cols / sb)
    bs = max(m, (block_size // m) * m)  # blocks hold whole groups
    W = W.float().clone()
    W[:, prep.dead] = 0.0
    U = prep.U.float()
    d = torch.diagonal(U).clone()
    v = 1.0 / d.square()
    fit_w = _level_weights(v, level_weight, sb >= cols)
    dev = W.device
    alpha = torch.zeros(out, nb, device=dev)
    mu = torch.zeros(out, nb, device=dev)
    mask = torch.zeros(out, cols, dtype=torch.bool, device=dev)
    signs = torch.zeros(out, cols, dtype=torch.bool, device=dev)
    fitted = 0  # scale blocks fitted so far
    if levels is not None:  # fixed levels (a later sweep): masks are chosen lazily from them
        alpha, mu = levels[0].float().clone(), levels[1].float().clone()
        fitted = nb
        lazy_mask = True
    for s in range(0, cols, bs):
        e = min(s + bs, cols)
        # (1) fit the levels of every scale block that starts inside [s, e), on current values
        k1 = min(nb, math.ceil(e / sb))
        if k1 > fitted:
            a0, a1 = fitted * sb, min(k1 * sb, cols)
            sel_kw = dict(scale_block=sb, refine_rounds=refine_rounds, col_weight=v[a0:a1],
                          fit_weight=fit_w[a0:a1] if fit_w is not None else None)
            if method == "spbo":
                res = spbo_select(W[:, a0:a1], n, m, steps=steps, reselect_rounds=reselect_rounds, **sel_kw)
            else:
                res = oneshot_select(W[:, a0:a1], n, m, **sel_kw)
            mask[:, a0:a1], signs[:, a0:a1], alpha[:, fitted:k1], mu[:, fitted:k1] = res
            fitted = k1
        blk = slice(s, e)
        a_cols = alpha[:, (torch.arange(s, e, device=dev) // sb)]
        u_cols = mu[:, (torch.arange(s, e, device=dev) // sb)]
        if compensation == "column":
            Err = _column_block(W, U, d, v, mask, signs, a_cols, u_cols, s, e, n, m, method,
                                lazy_mask and n < m, group_decision == "dynamic")
            if e < cols:
                W[:, e:] -= Err @ U[s:e, e:]
            continue
        if lazy_mask and n < m:
            sc = _select_scores(W[:, blk], a_cols, u_cols, 1, v[blk], method)
            mask[:, blk] = nm_mask_from_scores(sc, n, m)
        q, sg = _quantize(W[:, blk], mask[:, blk], a_cols, u_cols)
        signs[:, blk] = sg
        E = W[:, blk] - q
        W[:, blk] = q
        if e < cols and compensation != "none":
            if compensation == "block":
                Ub = U[s:e, s:e]
                Eu = torch.linalg.solve_triangular(Ub, E, upper=True, left=False)
            else:
                Eu = E / d[s:e].unsqueeze(0)
            W[:, e:] -= Eu @ U[s:e, e:]
    return mask, signs, alpha, mu


def _column_block(
    W: torch.Tensor, U: torch.Tensor, d: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor,
    a_cols: torch.Tensor, u_cols: torch.Tensor, s: int, e: int, n: int, m: int, method: str, lazy: bool,
    dynamic: bool,
) -> torch.Tensor:
    """Column-by-column sweep of block ``[s, e)`` (GPTQ/SparseGPT); returns the block's scaled errors.

    Works on the transposed block (one contiguous row per column) and defers the update of the block's
    later groups to one product per group (GPTQ's lazy batch, at group granularity): the same arithmetic
    as updating every later column after every column, since a column is only read once the sweep
    reaches it. ``W``, ``mask`` and ``signs`` are written in place.
    """
    out = W.shape[0]
    Wt = W[:, s:e].T.contiguous()  # [e - s, out]
    Et = torch.empty_like(Wt)
    At, Ut = a_cols.T.contiguous(), u_cols.T.contiguous()
    Mt = mask[:, s:e].T.contiguous()
    St = torch.zeros_like(Mt)
    for g0 in range(0, e - s, m):
        g1 = min(g0 + m, e - s)
        if lazy and not dynamic:
            sc = _select_scores(Wt[g0:g1].T, At[g0:g1].T, Ut[g0:g1].T, 1, v[s + g0:s + g1], method)
            Mt[g0:g1] = nm_mask_from_scores(sc, n, m).T
        left = torch.full((out,), m - n, dtype=torch.long, device=W.device)
        for jj in range(g0, g1):
            j = s + jj
            if lazy and dynamic:  # re-score the group's remaining columns after every compensation step
                sc = _select_scores(Wt[jj:g1].T, At[jj:g1].T, Ut[jj:g1].T, 1, v[j:s + g1], method)
                below = (sc[:, 1:] < sc[:, :1]).sum(1)
                prune = (left >= g1 - jj) | (below < left)
                Mt[jj] = ~prune
                left = left - prune.long()
            w = Wt[jj]
            q, sg = _quantize(w, Mt[jj], At[jj], Ut[jj])
            St[jj] = sg
            err = (w - q).div_(d[j])
            Wt[jj] = q
            Et[jj] = err
            if jj + 1 < g1:
                Wt[jj + 1:g1].addr_(U[j, j + 1:s + g1], err, alpha=-1.0)
        if g1 < e - s:
            Wt[g1:].addmm_(U[s + g0:s + g1, s + g1:e].T, Et[g0:g1], alpha=-1.0)
    W[:, s:e] = Wt.T
    mask[:, s:e] = Mt.T
    signs[:, s:e] = St.T
    return Et.T
