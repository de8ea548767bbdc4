"""PBS²P for one weight: binarizer, SPBO, fine (OBS) selection and error compensation.

Read next to the paper (Yan et al., 2025, arXiv:2502.01705). ``Ŵ = mask ⊙ (α·B + μ)``, ``B ∈ {±1}``,
one ``(α, μ)`` per output row (or per row and ``scale_block`` columns); in every group of ``m``
consecutive inputs ``n`` weights are kept. The paper has no code; where it is silent this is our
reading, and what it adds is listed in :data:`EXTRAS` (see ``docs/method.md``).

Example:
    >>> import torch
    >>> W, X = torch.randn(16, 64), torch.randn(256, 64)
    >>> bw = compress(W, 2 * X.T @ X / 256, 4, 8)
    >>> bw.mask.view(16, 8, 8).sum(-1).unique().tolist(), bw.alpha.shape
    ([4], torch.Size([16, 1]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.packing import check_nm, dense, expand_scales
from .hessian import PreparedHessian, output_error_sq, prepare_hessian

COMPENSATIONS = ("column", "block", "block-diag", "none")
#: Additions beyond the paper: act-order over M-groups, least-squares refit of α, μ under H followed by a
#: second sweep with the refitted levels, and OBS-weighted α/μ fits. All on by default.
EXTRAS = ("act_order", "refit", "obs_weights")


@dataclass
class BinarizedWeight:
    """Bool ``mask``/``signs`` ``[out, in]`` (True = +1) and float32 ``alpha``, ``mu`` ``[out, n_blocks]``."""

    mask: torch.Tensor
    signs: torch.Tensor
    alpha: torch.Tensor
    mu: torch.Tensor
    scale_block: int

    def dequantize(self) -> torch.Tensor:
        """Dense float32 ``Ŵ``."""
        ternary = torch.where(self.signs, 1, -1).to(torch.int8) * self.mask
        return dense(ternary, self.alpha.float(), self.mu.float(), self.scale_block, torch.float32)


# ------------------------------------------------------------------------------ binarizer (§3.1)
def fit_values(vals: torch.Tensor, weight: torch.Tensor | None = None, *, rounds: int = 3):
    """Binarizer on values ``[out, nb, K]``: ``(B > 0, α, μ)`` minimising ``Σ weight·(w − αB − μ)²``.

    ``μ₀ = mean w``, ``B = sign(w − μ)``, ``α = mean|w − μ|``; then ``rounds`` ARB-style rounds
    ``μ = mean(w − αB)``, ``B = sign(w − μ)``, ``α = mean B(w − μ)``. Each update is an exact
    coordinate minimiser, so the error never grows and ``‖W − Ŵ‖ ≤ ‖W‖``. ``weight = 0`` = not kept.
    """
    if weight is None:
        inv, live = 1.0 / vals.shape[-1], 1.0
    else:
        denom = weight.sum(-1).expand(vals.shape[:-1])
        live = (denom > 0).float()
        inv = live / denom.clamp_min(1e-30)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x if weight is None else weight * x).sum(-1) * inv

    mean_w = mean(vals)
    mu = mean_w
    centred = vals - mu.unsqueeze(-1)
    alpha = torch.linalg.vector_norm(centred, ord=1, dim=-1) * inv if weight is None else mean(centred.abs())
    for _ in range(rounds):
        mu = mean_w - alpha * (2.0 * mean((centred >= 0).float()) - live)
        centred = vals - mu.unsqueeze(-1)
        alpha = torch.linalg.vector_norm(centred, ord=1, dim=-1) * inv if weight is None else mean(centred.abs())
    return centred >= 0, alpha.clamp_min(0.0), mu


def fit_binary(W: torch.Tensor, mask: torch.Tensor, scale_block: int, *, rounds: int = 3,
               col_weight: torch.Tensor | None = None):
    """``(signs, α, μ)`` of ``W`` over the kept set ``mask``, per row and ``scale_block`` columns."""
    out, cols = W.shape
    sb = min(scale_block, cols)
    nb = math.ceil(cols / sb)
    if bool(mask.all()) and cols % sb == 0:
        v = None if col_weight is None else col_weight.float().reshape(1, nb, sb)
        pos, alpha, mu = fit_values(W.float().reshape(out, nb, sb), v, rounds=rounds)
        return pos.reshape(out, cols), alpha, mu
    pad = nb * sb - cols
    w = torch.nn.functional.pad(W.float(), (0, pad)).reshape(out, nb, sb)
    k = torch.nn.functional.pad(mask.float(), (0, pad)).reshape(out, nb, sb)
    if col_weight is not None:
        k = k * torch.nn.functional.pad(col_weight.float(), (0, pad)).reshape(1, nb, sb)
    pos, alpha, mu = fit_values(w, k, rounds=rounds)
    return (pos & (k > 0)).reshape(out, -1)[:, :cols], alpha, mu


# ------------------------------------------------------------- SPBO and fine selection (§3.2, §3.3)
def prune_cost(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, v: torch.Tensor | None = None):
    """``Δ = v·[w² − (|w − μ| − α)²]``: error added by pruning ``w`` instead of keeping it binarized."""
    delta = w.square() - ((w - mu).abs() - alpha).square()
    return delta if v is None else delta * v


def top_n(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of the ``n`` highest scores in every group of ``m`` consecutive columns."""
    g = scores.reshape(scores.shape[0], -1, m)
    idx = torch.topk(g, n, dim=-1, sorted=False).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(scores.shape)


def spbo(W: torch.Tensor, n: int, m: int, *, scale_block: int, steps: int | None = None, rounds: int = 3,
         score_weight: torch.Tensor | None = None, fit_weight: torch.Tensor | None = None):
    """SPBO: start dense-binarized; step ``t`` of ``τ`` prunes, in every group, the weights of lowest ``Δ``
    under the current ``α_t, μ_t`` up to ``round(t(m − n)/τ)`` pruned, then refits ``α, μ, B`` on what is
    kept. Returns ``mask, signs, α, μ``. A ranking fixed up front would equal one-shot pruning; the
    refit between steps is what makes the steps differ (our reading of §3.2)."""
    out, cols = W.shape
    tau = m - n if steps is None else steps
    G, sb = cols // m, min(scale_block, cols)
    nb = math.ceil(cols / sb)
    pad = nb * (sb // m) - G  # groups missing from the last scale block
    vals = W.float().reshape(out, G, m)
    pos = torch.arange(m, dtype=torch.uint8, device=W.device).expand(out, G, m)
    sw = None if score_weight is None else score_weight.float().reshape(1, G, m).expand(out, G, m)
    fw = None if fit_weight is None else fit_weight.float().reshape(1, G, m).expand(out, G, m)
    if pad and fw is None:
        fw = torch.ones(out, G, m, device=W.device)

    def fit():
        k = vals.shape[-1]
        v = torch.nn.functional.pad(vals, (0, 0, 0, pad)).reshape(out, nb, -1)
        f = None if fw is None else torch.nn.functional.pad(fw, (0, 0, 0, pad)).reshape(out, nb, -1)
        positive, alpha, mu = fit_values(v, f, rounds=rounds)
        return positive.reshape(out, -1, k)[:, :G], alpha, mu

    positive, alpha, mu = fit()
    for t in range(1, tau + 1):
        keep = m - round(t * (m - n) / tau)
        if keep == vals.shape[-1]:
            continue
        a = expand_scales(alpha, sb // m, G).unsqueeze(-1)  # per group
        u = expand_scales(mu, sb // m, G).unsqueeze(-1)
        idx = torch.topk(prune_cost(vals, a, u, sw), keep, dim=-1, sorted=False).indices
        vals, pos = torch.gather(vals, -1, idx), torch.gather(pos, -1, idx)
        sw = None if sw is None else torch.gather(sw, -1, idx)
        fw = None if fw is None else torch.gather(fw, -1, idx)
        positive, alpha, mu = fit()
    idx = pos.long()
    mask = torch.zeros(out, G, m, dtype=torch.bool, device=W.device).scatter_(-1, idx, True)
    signs = torch.zeros_like(mask).scatter_(-1, idx, positive)
    return mask.reshape(out, cols), signs.reshape(out, cols), alpha, mu


def oneshot(W: torch.Tensor, n: int, m: int, *, scale_block: int, rounds: int = 3,
            score_weight: torch.Tensor | None = None, fit_weight: torch.Tensor | None = None):
    """SPBO off: keep the top-``n`` OBS saliencies ``v·w²`` (magnitude without data) at once, then binarize."""
    scores = W.float().square() if score_weight is None else W.float().square() * score_weight.reshape(1, -1)
    mask = top_n(scores, n, m)
    return (mask, *fit_binary(W, mask, scale_block, rounds=rounds, col_weight=fit_weight))


# ------------------------------------------------------------------ error compensation (§3.4)
def sweep(W: torch.Tensor, prep: PreparedHessian, n: int, m: int, *, scale_block: int, steps: int | None,
          rounds: int, compensation: str, block_size: int, levels: tuple | None, fit_weight: torch.Tensor | None):
    """GPTQ-style sweep over blocks of ``block_size`` columns: select, binarize, push the error onward.

    The ``(α, μ)`` of a scale block are fitted (SPBO, or one-shot with ``steps=0``) on the current
    compensated values when the sweep reaches the block, or given as ``levels``; every group's kept set
    is then re-chosen from the compensated values by ``Δ`` (one-shot: ``v·w²``), ``v = 1/U_jj²``.
    ``"column"``: GPTQ/SparseGPT, column by column inside a block; ``"block"``: the exact block update
    ``W[:, e:] −= (E·U_bb⁻¹)·U[s:e, e:]`` after each block; ``"block-diag"``: BiLLM's ``E/diag(U_bb)``.
    """
    out, cols = W.shape
    nb = math.ceil(cols / scale_block)
    bs = max(m, (block_size // m) * m)
    W = W.float().clone()
    W[:, prep.dead] = 0.0
    U, d = prep.U.float(), torch.diagonal(prep.U.float()).clone()
    v = 1.0 / d.square()
    mask = torch.zeros(out, cols, dtype=torch.bool, device=W.device)
    signs = torch.zeros_like(mask)
    if levels is None:
        alpha, mu, fitted = torch.zeros(out, nb, device=W.device), torch.zeros(out, nb, device=W.device), 0
    else:
        alpha, mu, fitted = levels[0].float().clone(), levels[1].float().clone(), nb
    select, kw = (oneshot, {}) if steps == 0 else (spbo, {"steps": steps})
    for s in range(0, cols, bs):
        e = min(s + bs, cols)
        k1 = min(nb, math.ceil(e / scale_block))
        if k1 > fitted:  # levels of the scale blocks that start here, on the compensated values
            a0, a1 = fitted * scale_block, min(k1 * scale_block, cols)
            fw = None if fit_weight is None else fit_weight[a0:a1]
            _, _, alpha[:, fitted:k1], mu[:, fitted:k1] = select(
                W[:, a0:a1], n, m, scale_block=scale_block, rounds=rounds, score_weight=v[a0:a1], fit_weight=fw, **kw)
            fitted = k1
        blk = torch.arange(s, e, device=W.device) // scale_block
        a, u = alpha[:, blk].T.contiguous(), mu[:, blk].T.contiguous()
        Wt, Et = W[:, s:e].T.contiguous(), torch.empty(e - s, out, device=W.device)
        Mt, St = torch.zeros_like(Wt, dtype=torch.bool), torch.zeros_like(Wt, dtype=torch.bool)
        for g0 in range(0, e - s, m):  # each group's kept set, chosen when the sweep reaches it
            g1, w, vg = g0 + m, Wt[g0:g0 + m].T, v[s + g0:s + g0 + m]
            Mt[g0:g1] = top_n(w.square() * vg if steps == 0 else prune_cost(w, a[g0:g1].T, u[g0:g1].T, vg), n, m).T
            if compensation != "column":
                continue
            for j in range(g0, g1):
                q, St[j] = _binarize(Wt[j], Mt[j], a[j], u[j])
                Et[j] = (Wt[j] - q).div_(d[s + j])
                Wt[j] = q
                if j + 1 < g1:
                    Wt[j + 1:g1].addr_(U[s + j, s + j + 1:s + g1], Et[j], alpha=-1.0)
            if g1 < e - s:
                Wt[g1:].addmm_(U[s + g0:s + g1, s + g1:e].T, Et[g0:g1], alpha=-1.0)
        mask[:, s:e] = Mt.T
        if compensation == "column":
            signs[:, s:e], E = St.T, Et.T
        else:
            q, signs[:, s:e] = _binarize(W[:, s:e], mask[:, s:e], a.T, u.T)
            E = W[:, s:e] - q
            if compensation == "block":
                E = torch.linalg.solve_triangular(U[s:e, s:e], E, upper=True, left=False)
            elif compensation == "block-diag":
                E = E / d[s:e].unsqueeze(0)
        if e < cols and compensation != "none":
            W[:, e:] -= E @ U[s:e, e:]
    return mask, signs, alpha, mu


def _binarize(w, keep, a, u):
    positive = w >= u
    q = torch.where(positive, u + a, u - a)
    return torch.where(keep, q, torch.zeros((), device=w.device)), positive & keep


def group_order(h_diag: torch.Tensor, m: int, scale_block: int) -> torch.Tensor:
    """Act-order at group granularity: M-groups by decreasing ``Σ diag H`` inside each scale block."""
    gpb, g = scale_block // m, h_diag.reshape(-1, m).sum(1)
    perm = []
    for b0 in range(0, g.numel(), gpb):
        idx = torch.arange(b0, min(b0 + gpb, g.numel()), device=h_diag.device)
        idx = idx[torch.argsort(g[idx], descending=True, stable=True)]
        perm.append((idx.unsqueeze(1) * m + torch.arange(m, device=h_diag.device)).reshape(-1))
    return torch.cat(perm)


def refit(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor,
          mu: torch.Tensor, scale_block: int):
    """Least-squares ``(α, μ)`` minimising ``tr((W − Ŵ)H(W − Ŵ)ᵀ)`` for fixed mask and signs, and that error.

    ``Ŵ_r`` is linear in ``θ_r = (α_r·, μ_r·)``: one ``2·n_blocks`` system per row. A row keeps its
    given scales if the solution has ``α < 0``, is not finite, or is not better.
    """
    out, cols = W.shape
    nb = math.ceil(cols / scale_block)
    Hf, Wf, kf = H.float(), W.float(), mask.float()
    bf = torch.where(signs, 1.0, -1.0) * kf
    ZW = Wf @ Hf
    wHw = (ZW * Wf).double().sum(1)
    G = torch.zeros(out, 2 * nb, 2 * nb, dtype=torch.float64, device=W.device)
    g = torch.zeros(out, 2 * nb, dtype=torch.float64, device=W.device)
    blocks = [slice(i * scale_block, min((i + 1) * scale_block, cols)) for i in range(nb)]
    for i, si in enumerate(blocks):
        zb, zk = bf[:, si] @ Hf[si, :], kf[:, si] @ Hf[si, :]
        g[:, i] = (bf[:, si] * ZW[:, si]).double().sum(1)
        g[:, nb + i] = (kf[:, si] * ZW[:, si]).double().sum(1)
        for j, sj in enumerate(blocks):
            G[:, i, j] = (zb[:, sj] * bf[:, sj]).double().sum(1)
            G[:, i, nb + j] = (zb[:, sj] * kf[:, sj]).double().sum(1)
            G[:, nb + i, j] = (zk[:, sj] * bf[:, sj]).double().sum(1)
            G[:, nb + i, nb + j] = (zk[:, sj] * kf[:, sj]).double().sum(1)
    G = 0.5 * (G + G.transpose(1, 2))
    scale = torch.diagonal(G, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    eye = torch.eye(2 * nb, dtype=torch.float64, device=W.device)
    theta, info = torch.linalg.solve_ex(G + 1e-8 * scale.view(-1, 1, 1) * eye, g)
    ok = (info == 0) & torch.isfinite(theta).all(1) & (theta[:, :nb] >= 0).all(1)
    old = torch.cat([alpha.double().reshape(out, nb), mu.double().reshape(out, nb)], 1)
    theta = torch.where(ok.unsqueeze(1), theta, old)

    def err(t):
        return wHw - 2.0 * (t * g).sum(1) + (t.unsqueeze(1) @ G @ t.unsqueeze(2)).reshape(-1)

    better = err(theta) <= err(old)
    theta = torch.where(better.unsqueeze(1), theta, old)
    error = float(torch.where(better, err(theta), err(old)).clamp_min(0).sum())
    return theta[:, :nb].float(), theta[:, nb:].float(), error


# ----------------------------------------------------------------------------------- one weight
def compress(W: torch.Tensor, H: torch.Tensor | None, n: int, m: int, *, scale_block: int | None = None,
             spbo_steps: int | None = None, refine_rounds: int = 3, compensation: str = "column",
             extras: tuple[str, ...] = EXTRAS, block_size: int = 128, damp: float = 0.01) -> BinarizedWeight:
    """Prune ``W`` ``[out, in]`` to ``n:m`` and binarize what is kept; ``H`` ``[in, in]`` or ``None`` (data-free).

    ``spbo_steps``: τ (default ``m − n``; 0 = one-shot). Without ``H``: SPBO on the whole weight (OBS = magnitude,
    nothing to compensate). With ``H``: the compensated :func:`sweep`, and the :data:`EXTRAS` asked for.
    """
    check_weight(W)
    out, cols = W.shape
    check_nm(n, m, cols, packed=False)
    sb = cols if scale_block is None else min(scale_block, cols)
    if sb < cols and (sb < 1 or sb % m):
        raise ValueError(f"scale_block must be a positive multiple of m = {m} (or None), got {scale_block}")
    if compensation not in COMPENSATIONS or not set(extras) <= set(EXTRAS):
        raise ValueError(f"compensation must be one of {COMPENSATIONS} and extras a subset of {EXTRAS}")
    select = oneshot if spbo_steps == 0 else spbo
    kw = {} if spbo_steps == 0 else {"steps": spbo_steps}
    if H is None:
        mask, signs, alpha, mu = select(W.detach().float(), n, m, scale_block=sb, rounds=refine_rounds, **kw)
        return BinarizedWeight(mask, signs, alpha.contiguous(), mu.contiguous(), sb)
    check_weight(H, "H", square=cols)
    W, H = W.detach().float(), H.detach()
    perm = group_order(torch.diagonal(H).float(), m, sb) if "act_order" in extras else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    prep = prepare_hessian(H, damp)
    Wr = W.clone()
    Wr[:, prep.dead] = 0.0
    v = 1.0 / torch.diagonal(prep.U).square()
    fit_w = None if "obs_weights" not in extras else (v if sb >= cols else v.sqrt())
    opts = dict(scale_block=sb, steps=spbo_steps, rounds=refine_rounds, compensation=compensation,
                block_size=block_size, fit_weight=fit_w)
    best, best_err = None, math.inf
    for levels in (None, "refit") if "refit" in extras else (None,):
        mask, signs, alpha, mu = sweep(W, prep, n, m, levels=best[2:] if levels else None, **opts)
        if "refit" in extras:
            alpha, mu, error = refit(Wr, prep.H, mask, signs, alpha, mu, sb)
        else:
            error = output_error_sq(Wr, BinarizedWeight(mask, signs, alpha, mu, sb).dequantize(), prep.H)
        if error >= best_err:
            break
        best, best_err = (mask, signs, alpha, mu), error
    mask, signs, alpha, mu = best
    if perm is not None:
        inv = torch.argsort(perm)
        mask, signs = mask[:, inv], signs[:, inv]
    return BinarizedWeight(mask, signs, alpha.float().contiguous(), mu.float().contiguous(), sb)


def check_weight(W: torch.Tensor, name: str = "W", square: int | None = None) -> None:
    """Raise ``ValueError`` unless ``W`` is a finite, non-empty 2-D float tensor (``[square, square]``)."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor, got {getattr(W, 'shape', type(W).__name__)}")
    if square is not None and tuple(W.shape) != (square, square):
        raise ValueError(f"{name} must be [{square}, {square}] (in_features of W), got {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
