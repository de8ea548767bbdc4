"""SPBO — Stepwise semi-structured Pruning with Binarization Optimization (PBS²P §SPBO), and one-shot.

Start from the dense binarization of ``W``. In each of ``steps`` (τ) steps, prune a share of the
``m − n`` weights per group that still have to go, choosing **given the current binarized state**
``(α_t, μ_t, B_t)``: the cost of pruning kept weight ``j`` instead of keeping it binarized is ::

    Δ_j = v_j · [ w_j² − (|w_j − μ_t| − α_t)² ]        (v_j: column weight, 1/[U]_jj² with a Hessian)

(negative Δ: pruning *lowers* the error — near-zero weights cost ≈α² binarized but only w² pruned, which is
how pruning + binarization can beat binarization alone). Prune the lowest Δ, refit ``α, μ, B`` on what
is kept (:func:`~pbs2p.algorithms.binarize.fit_binary`), re-score, repeat. Because every step re-scores
with the refitted ``α_t, μ_t``, the final mask differs from a ranking fixed up front (which would make
progressive pruning *identical* to one-shot; see PAPER.md). This is our reading of the paper's text.

Schedule: after step t, each row has pruned ``round(t·G·(m−n)/τ)`` weights (G groups per row), taken
lowest-Δ first, at most one per group per sub-round, never more than ``m − n`` in a group; τ = m − n
is "one more weight per group per step"; τ = 1 is one-shot pruning by Δ under the dense fit.

Optional re-selection (``reselect_rounds``): Lloyd-style — with the levels fixed, keep in every group
the n weights with the largest Δ (pruned ones may come back), refit from the current μ; stops when the mask
is stable. Each round can only lower the (v-weighted) error.

Example:
    >>> import torch
    >>> W = torch.randn(8, 32)
    >>> mask, signs, alpha, mu = spbo_select(W, 4, 8, scale_block=32)
    >>> mask.view(8, 4, 8).sum(-1).unique().tolist()
    [4]
"""

from __future__ import annotations

import torch

from .binarize import fit_binary, fit_values
from .binarized import expand_blocks
from .nm_mask import group_view, nm_mask_from_scores


def prune_delta(
    W: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, scale_block: int,
    col_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Δ = v·[w² − (|w − μ| − α)²]``: error added by pruning ``w`` rather than keeping it binarized."""
    cols = W.shape[1]
    w = W.float()
    a = expand_blocks(alpha, scale_block, cols)
    u = expand_blocks(mu, scale_block, cols)
    delta = w.square() - ((w - u).abs() - a).square()
    if col_weight is not None:
        delta = delta * col_weight.float().reshape(1, -1)
    return delta


def _prune_quota(
    delta: torch.Tensor, mask: torch.Tensor, n: int, m: int, quota: torch.Tensor
) -> torch.Tensor:
    """Prune ``quota[r]`` more weights in row r, lowest Δ first, ≤ 1 per group per sub-round, ≥ n kept."""
    mask = mask.clone()
    gm = group_view(mask, m)
    gd = group_view(delta, m)
    quota = quota.clone()
    inf = torch.tensor(float("inf"), dtype=delta.dtype, device=delta.device)
    while bool((quota > 0).any()):
        prunable = gm & (gm.sum(-1, keepdim=True) > n)
        cand = torch.where(prunable, gd, inf)
        val, idx = cand.min(-1)  # [out, G]
        avail = torch.isfinite(val)
        if not bool(avail.any()):
            break
        if bool((quota >= avail.sum(1)).all()):  # every available group gives one (τ = m − n case)
            take = avail
        else:
            order = torch.argsort(val, dim=1, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            take = avail & (rank < quota.unsqueeze(1))
        rows, groups = take.nonzero(as_tuple=True)
        gm[rows, groups, idx[rows, groups]] = False
        quota = quota - take.sum(1)
        if not bool(take.any()):
            break
    return mask


def spbo_select(
    W: torch.Tensor,
    n: int,
    m: int,
    *,
    scale_block: int,
    steps: int | None = None,
    refine_rounds: int = 3,
    col_weight: torch.Tensor | None = None,
    reselect_rounds: int = 0,
    fit_weight: torch.Tensor | None | str = "same",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Progressive N:M pruning + binarization of ``W`` (see module docstring).

    Args:
        W: ``[out, in]``, ``in % m == 0``.
        n, m: keep ``n`` of every ``m`` (``n == m`` gives plain binarization).
        scale_block: columns per ``(α, μ)`` block.
        steps: τ, number of prune-and-refit steps (default ``m − n``).
        refine_rounds: ARB rounds in every refit.
        col_weight: optional ``[in]`` non-negative column weights (diagonal metric).
        reselect_rounds: Lloyd re-selection rounds after the last step (0 = off).
        fit_weight: column weights of the α/μ fits (``"same"``: ``col_weight``; ``None``: unweighted).
            Selection always uses ``col_weight``.

    Returns:
        ``mask, signs, alpha, mu``.
    """
    out, cols = W.shape
    tau = max(1, m - n) if steps is None else steps
    if tau < 1:
        raise ValueError(f"spbo steps must be >= 1, got {tau}")
    sb = min(scale_block, cols)
    fw = col_weight if isinstance(fit_weight, str) else fit_weight
    if n < m and tau == m - n and cols % sb == 0 and sb % m == 0:
        mask, signs, alpha, mu = _spbo_grouped(W, n, m, sb, refine_rounds, col_weight, fw)
    else:
        mask, signs, alpha, mu = _spbo_generic(W, n, m, sb, tau, refine_rounds, col_weight, fw)
    return reselect(W, mask, alpha, mu, n, m, scale_block=scale_block, rounds=reselect_rounds,
                    refine_rounds=refine_rounds, col_weight=col_weight, signs=signs, fit_weight=fw)


def _spbo_generic(
    W: torch.Tensor, n: int, m: int, sb: int, tau: int, refine_rounds: int, col_weight: torch.Tensor | None,
    fit_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPBO for any τ and block layout (full-size masks, quota schedule of the module docstring)."""
    out, cols = W.shape
    mask = torch.ones(out, cols, dtype=torch.bool, device=W.device)
    signs, alpha, mu = fit_binary(W, mask, sb, rounds=refine_rounds, col_weight=fit_weight)
    if n == m:
        return mask, signs, alpha, mu
    total = (cols // m) * (m - n)
    done = 0
    for t in range(1, tau + 1):
        target = round(t * total / tau)
        q = target - done
        if q <= 0:
            continue
        delta = prune_delta(W, alpha, mu, sb, col_weight)
        quota = torch.full((out,), q, dtype=torch.long, device=W.device)
        mask = _prune_quota(delta, mask, n, m, quota)
        done = target
        signs, alpha, mu = fit_binary(W, mask, sb, rounds=refine_rounds, col_weight=fit_weight)
    return mask, signs, alpha, mu


def _spbo_grouped(
    W: torch.Tensor, n: int, m: int, sb: int, refine_rounds: int, col_weight: torch.Tensor | None,
    fit_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPBO with τ = m − n on compact per-group storage: same selections as the generic loop.

    Every step removes exactly one weight per group, so the kept values stay a dense ``[out, G, k]``
    tensor (plus their positions); fits and scores then touch only kept values.
    """
    out, cols = W.shape
    G, nb = cols // m, cols // sb
    vals = W.float().reshape(out, G, m)
    pos = torch.arange(m, dtype=torch.uint8, device=W.device).expand(out, G, m)
    vw = None if col_weight is None else col_weight.float().reshape(1, G, m).expand(out, G, m)
    fw = None if fit_weight is None else fit_weight.float().reshape(1, G, m).expand(out, G, m)
    k = m

    def fit() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wt = None if fw is None else fw.reshape(out, nb, -1)
        return fit_values(vals.reshape(out, nb, -1), wt, rounds=refine_rounds)

    positive, alpha, mu = fit()
    while k > n:
        vv = vals.reshape(out, nb, -1, k)
        delta = vv.square() - ((vv - mu.reshape(out, nb, 1, 1)).abs() - alpha.reshape(out, nb, 1, 1)).square()
        delta = delta.reshape(out, G, k)
        if vw is not None:
            delta = delta * vw
        keep = torch.topk(delta, k - 1, dim=-1, sorted=False).indices
        vals = torch.gather(vals, -1, keep)
        pos = torch.gather(pos, -1, keep)
        if vw is not None:
            vw = torch.gather(vw, -1, keep)
        if fw is not None:
            fw = torch.gather(fw, -1, keep)
        k -= 1
        positive, alpha, mu = fit()
    idx = pos.long()
    mask = torch.zeros(out, G, m, dtype=torch.bool, device=W.device).scatter_(-1, idx, True)
    signs = torch.zeros(out, G, m, dtype=torch.bool, device=W.device)
    signs.scatter_(-1, idx, positive.reshape(out, G, k))
    return mask.reshape(out, cols), signs.reshape(out, cols), alpha, mu


def reselect(
    W: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, n: int, m: int, *,
    scale_block: int, rounds: int, refine_rounds: int = 3, col_weight: torch.Tensor | None = None,
    signs: torch.Tensor | None = None, fit_weight: torch.Tensor | None | str = "same",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd-style mask re-selection under fixed levels, then refit from the current μ (monotone)."""
    fw = col_weight if isinstance(fit_weight, str) else fit_weight
    if signs is None:
        signs, alpha, mu = fit_binary(W, mask, scale_block, rounds=refine_rounds, col_weight=fw)
    for _ in range(rounds):
        delta = prune_delta(W, alpha, mu, scale_block, col_weight)
        new = nm_mask_from_scores(delta, n, m)
        if torch.equal(new, mask):
            break
        mask = new
        signs, alpha, mu = fit_binary(W, mask, scale_block, rounds=refine_rounds, col_weight=fw, init_mu=mu)
    return mask, signs, alpha, mu


def oneshot_select(
    W: torch.Tensor,
    n: int,
    m: int,
    *,
    scale_block: int,
    scores: torch.Tensor | None = None,
    refine_rounds: int = 3,
    col_weight: torch.Tensor | None = None,
    fit_weight: torch.Tensor | None | str = "same",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune to N:M at once by ``scores`` (default OBS/magnitude ``v·w²``), then binarize what is kept."""
    if scores is None:
        scores = W.float().square()
        if col_weight is not None:
            scores = scores * col_weight.float().reshape(1, -1)
    mask = nm_mask_from_scores(scores, n, m)
    fw = col_weight if isinstance(fit_weight, str) else fit_weight
    signs, alpha, mu = fit_binary(W, mask, scale_block, rounds=refine_rounds, col_weight=fw)
    return mask, signs, alpha, mu
