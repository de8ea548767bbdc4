"""PBS²P for one weight: binarizer, SPBO, fine (OBS) selection and error compensation.

Read next to the paper (Yan et al., 2025, arXiv:2502.01705); ``docs/method.md`` says where it is silent
and what :data:`EXTRAS` add. ``Ŵ = mask ⊙ (α·B + μ)``, ``B ∈ {±1}``, one ``(α, μ)`` per output row (or
per row and ``scale_block`` columns); in every group of ``m`` consecutive inputs ``n`` weights are kept.

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

from ..kernels.native import sweep_op
from ..kernels.packing import check_nm, dense, expand_scales

COMPENSATIONS = ("column", "block", "block-diag", "none")
#: Additions beyond the paper (calibrated only): act-order over M-groups; least-squares refit of α, μ under H
#: after every step instead of the closed-form one, plus a last sweep with the final levels; OBS-weighted fits.
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


# -------------------------------------------------------------------------------- the Hessian
@dataclass
class PreparedHessian:
    """``H`` damped and repaired (float64), the upper Cholesky factor ``U`` of its inverse (float32)."""

    H: torch.Tensor
    U: torch.Tensor
    dead: torch.Tensor  # bool [in]: inputs that are always zero


def prepare_hessian(H: torch.Tensor, damp: float = 0.01, max_retries: int = 6) -> PreparedHessian:
    """Damp ``H`` by ``damp·mean(diag H)`` and factor its inverse, growing the damping ×10 (up to 6 times)
    while the Cholesky factorization fails. Dead inputs (``H_jj = 0``: their weights never reach the
    output) get the mean diagonal, so scaling ``H`` scales ``U`` and nothing else changes."""
    Hd = H.double().clone()
    Hd = 0.5 * (Hd + Hd.T)
    diag = torch.diagonal(Hd)
    dead = diag <= 0
    mean_diag = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    diag[dead] = mean_diag
    diag += damp * mean_diag
    eye = torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
    extra = 0.0  # additional damping, as a fraction of mean(diag H)
    for _ in range(max_retries + 1):
        Ht = Hd + (extra * mean_diag) * eye if extra else Hd
        L, info = torch.linalg.cholesky_ex(Ht)
        if int(info) == 0:
            U, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return PreparedHessian(H=Ht, U=U.float(), dead=dead)
        extra = max(damp, 1e-4) if extra == 0.0 else extra * 10.0
    raise ValueError("H is not positive definite even after increasing the damping 10^6-fold")


# ------------------------------------------------------------------------------------- binarizer
def fit_values(vals: torch.Tensor, weight: torch.Tensor | None = None, *, rounds: int = 3):
    """Binarizer on ``[out, nb, K]`` values: ``(B > 0, α, μ)`` minimising ``Σ weight·(w − αB − μ)²``.

    ``μ₀ = mean w``, ``B = sign(w − μ)``, ``α = mean|w − μ|``, then ``rounds`` ARB-style rounds of
    ``μ = mean(w − αB)``, ``B = sign(w − μ)``, ``α = mean B(w − μ)``: exact coordinate minimisers, so the
    error never grows and ``‖W − Ŵ‖ ≤ ‖W‖``. ``weight = 0`` means not kept.
    """
    if weight is None:
        inv, live = 1.0 / vals.shape[-1], 1.0
    else:
        denom = weight.sum(-1).expand(vals.shape[:-1])
        live = (denom > 0).float()
        inv = live / denom.clamp_min(1e-30)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x if weight is None else weight * x).sum(-1) * inv

    def mean_abs(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, ord=1, dim=-1) * inv if weight is None else mean(x.abs())

    mean_w = mu = mean(vals)
    centred = vals - mu.unsqueeze(-1)
    alpha = mean_abs(centred)
    for _ in range(rounds):
        mu = mean_w - alpha * (2.0 * mean((centred >= 0).float()) - live)
        centred = vals - mu.unsqueeze(-1)
        alpha = mean_abs(centred)
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


# -------------------------------------------------------------- SPBO and the fine (OBS) selection
def prune_cost(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, v: torch.Tensor | None = None):
    """``Δ = v·[w² − (|w − μ| − α)²]``: error added by pruning ``w`` instead of keeping it binarized."""
    delta = w.square() - ((w - mu).abs() - alpha).square()
    return delta if v is None else delta * v


def top_n(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of the ``n`` highest scores in every group of ``m`` consecutive columns (ties: the lower column)."""
    g = scores.reshape(scores.shape[0], -1, m)
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(scores.shape)


def schedule(n: int, m: int, steps: int | None) -> list[int]:
    """Weights pruned per group after each SPBO step: ``round(t(m − n)/τ)``, ``τ = steps`` (default ``m − n``)."""
    tau = max(1, m - n) if steps is None else steps
    return sorted({round(t * (m - n) / tau) for t in range(1, tau + 1)} - {0}) or [0]


def spbo(W: torch.Tensor, n: int, m: int, *, scale_block: int, steps: int | None = None, rounds: int = 3):
    """SPBO without data (§3.2): start dense-binarized; each step prunes, in every group, the kept weights
    of lowest ``Δ`` under the current ``α, μ`` (see :func:`schedule`), then refits ``α, μ, B`` on what is
    kept. A ranking fixed up front would equal one-shot pruning; the refits make the steps differ."""
    out, cols = W.shape
    G, sb = cols // m, min(scale_block, cols)
    nb = math.ceil(cols / sb)
    pad = nb * (sb // m) - G  # groups missing from the last scale block
    vals = W.float().reshape(out, G, m)
    pos = torch.arange(m, dtype=torch.uint8, device=W.device).expand(out, G, m)
    fw = torch.ones(out, G, m, device=W.device) if pad else None

    def fit():
        k = vals.shape[-1]
        v = torch.nn.functional.pad(vals, (0, 0, 0, pad)).reshape(out, nb, -1)
        f = None if fw is None else torch.nn.functional.pad(fw, (0, 0, 0, pad)).reshape(out, nb, -1)
        positive, alpha, mu = fit_values(v, f, rounds=rounds)
        return positive.reshape(out, -1, k)[:, :G], alpha, mu

    positive, alpha, mu = fit()
    for pruned in schedule(n, m, steps) if n < m else []:
        a = expand_scales(alpha, sb // m, G).unsqueeze(-1)  # per group
        u = expand_scales(mu, sb // m, G).unsqueeze(-1)
        idx = torch.topk(prune_cost(vals, a, u), m - pruned, dim=-1, sorted=False).indices
        vals, pos = torch.gather(vals, -1, idx), torch.gather(pos, -1, idx)
        fw = None if fw is None else torch.gather(fw, -1, idx)
        positive, alpha, mu = fit()
    idx = pos.long()
    mask = torch.zeros(out, G, m, dtype=torch.bool, device=W.device).scatter_(-1, idx, True)
    signs = torch.zeros_like(mask).scatter_(-1, idx, positive)
    return mask.reshape(out, cols), signs.reshape(out, cols), alpha, mu


# ------------------------------------------------------------------------- error compensation
def sweep(W: torch.Tensor, prep: PreparedHessian, n: int, m: int, *, levels: tuple, scale_block: int,
          pruned: torch.Tensor, oneshot: bool, compensation: str, block_size: int):
    """One GPTQ-style pass over blocks of ``block_size`` columns: select, binarize, push the error onward.

    Each group keeps, among the weights not ``pruned`` yet, the ``n`` of highest SPBO cost ``Δ`` under the
    given ``levels`` (one-shot: OBS saliency ``v·w²``), ``v = 1/U_jj²``, from its compensated values when the
    sweep reaches it. ``"column"``: GPTQ/SparseGPT, column by column; ``"block"``: the exact update
    ``W[:, e:] −= (E·U_bb⁻¹)·U[s:e, e:]`` after each block; ``"block-diag"``: BiLLM's ``E/diag(U_bb)``.
    Returns ``mask, signs``, the values each column had when binarized, and ``Σ err²`` (equal to the output
    error ``tr((W − Ŵ)H(W − Ŵ)ᵀ)`` for the exact updates).
    """
    out, cols = W.shape
    W = W.float().clone()
    W[:, prep.dead] = 0.0
    U, d = prep.U.float(), torch.diagonal(prep.U.float()).clone()
    v = 1.0 / d.square()
    mask, signs, arrived = torch.zeros_like(W, dtype=torch.bool), torch.zeros_like(W, dtype=torch.bool), W.clone()
    loss, bs, dl, native = 0.0, max(m, block_size // m * m), d.tolist(), sweep_op(W)
    for s in range(0, cols, bs):
        e = min(s + bs, cols)
        blk = torch.arange(s, e, device=W.device) // scale_block
        a, u = levels[0][:, blk].float().T.contiguous(), levels[1][:, blk].float().T.contiguous()
        hi, lo = u + a, u - a
        Wt, Mt = W[:, s:e].T.contiguous(), pruned[:, s:e].T.contiguous()  # Mt: pruned before, then the new mask
        Et = torch.zeros(e - s, out, device=W.device)
        if native is not None:  # the loop below in one native call, the same arithmetic
            native(Wt, Mt, Et, a, u, hi, lo, v, U, d, s, n, m, oneshot, compensation == "column")
        for g0 in range(0, e - s, m) if native is None else ():  # each group's kept set, chosen on arrival
            g1, w, vg = g0 + m, Wt[g0:g0 + m].T, v[s + g0:s + g0 + m]
            scores = w.square() * vg if oneshot else prune_cost(w, a[g0:g1].T, u[g0:g1].T, vg)
            Mt[g0:g1] = top_n(scores.masked_fill(Mt[g0:g1].T, -math.inf), n, m).T
            if compensation != "column":
                continue
            Ug, keep = U[s + g0:s + g1, s + g0:e], Mt[g0:g1]
            rows, errs, ups = Wt[g0:g1].unbind(), Et[g0:g1].unbind(), u[g0:g1].unbind()
            his, los = (hi[g0:g1] * keep).unbind(), (lo[g0:g1] * keep).unbind()
            for j, x in enumerate(rows):  # Wt rows keep their value on arrival: later columns alone are updated
                torch.sub(x, torch.where(x >= ups[j], his[j], los[j]), out=errs[j]).div_(dl[s + g0 + j])
                if j + 1 < m:  # the product rounded, then the difference (no fused multiply-add: the same everywhere)
                    Wt[g0 + j + 1:g1].sub_(torch.outer(Ug[j, j + 1:m], errs[j]))
            if g1 < e - s:
                Wt[g1:].addmm_(Ug[:, m:].T, Et[g0:g1], alpha=-1.0)
        mask[:, s:e], arrived[:, s:e] = Mt.T, Wt.T
        signs[:, s:e] = (Wt >= u).T & mask[:, s:e]
        if compensation == "column":
            E = Et.T
        else:
            E = W[:, s:e] - torch.where(signs[:, s:e], hi.T, lo.T) * mask[:, s:e]
            exact = compensation == "block"
            E = torch.linalg.solve_triangular(U[s:e, s:e], E, upper=True, left=False) if exact else E / d[s:e]
        loss += float(E.double().square().sum())
        if e < cols and compensation != "none":
            W[:, e:] -= E @ U[s:e, e:]
    return mask, signs, arrived, loss


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

    ``Ŵ_r`` is linear in ``θ_r = (α_r·, μ_r·)``: one ``2·n_blocks`` system per row. A row keeps the given
    scales where the solution has ``α < 0``, is not finite, or is not better.
    """
    out, cols = W.shape
    nb = math.ceil(cols / scale_block)
    Hf, Wf, kf = H.float(), W.float(), mask.float()
    ZW = Wf @ Hf
    blocks = [slice(i * scale_block, min((i + 1) * scale_block, cols)) for i in range(nb)]
    design = [(x, s) for x in (torch.where(signs, 1.0, -1.0) * kf, kf) for s in blocks]  # d Ŵ / d θ
    G = torch.zeros(out, 2 * nb, 2 * nb, dtype=torch.float64, device=W.device)
    g = torch.zeros(out, 2 * nb, dtype=torch.float64, device=W.device)
    for a, (x, s) in enumerate(design):
        zx = x[:, s] @ Hf[s, :]
        g[:, a] = (x[:, s] * ZW[:, s]).double().sum(1)
        for b, (y, t) in enumerate(design):
            G[:, a, b] = (zx[:, t] * y[:, t]).double().sum(1)
    G = 0.5 * (G + G.transpose(1, 2))
    ridge = 1e-8 * torch.diagonal(G, dim1=1, dim2=2).mean(1).clamp_min(1e-30).view(-1, 1, 1)
    theta, info = torch.linalg.solve_ex(G + ridge * torch.eye(2 * nb, dtype=torch.float64, device=W.device), g)
    old = torch.cat([alpha.double().reshape(out, nb), mu.double().reshape(out, nb)], 1)
    ok = (info == 0) & torch.isfinite(theta).all(1) & (theta[:, :nb] >= 0).all(1)
    theta = torch.where(ok[:, None], theta, old)
    wHw = (ZW * Wf).double().sum(1)
    new_err, old_err = (wHw - 2.0 * (t * g).sum(1) + (t.unsqueeze(1) @ G @ t.unsqueeze(2)).reshape(-1)
                        for t in (theta, old))
    theta = torch.where((new_err <= old_err).unsqueeze(1), theta, old)
    return theta[:, :nb].float(), theta[:, nb:].float(), float(torch.minimum(new_err, old_err).clamp_min(0).sum())


# -------------------------------------------------------------------------------------- one weight
def compress(W: torch.Tensor, H: torch.Tensor | None, n: int, m: int, *, scale_block: int | None = None,
             spbo_steps: int | None = None, refine_rounds: int = 3, compensation: str = "column",
             extras: tuple[str, ...] | list[str] = EXTRAS, block_size: int = 128, damp: float = 0.01
             ) -> BinarizedWeight:
    """Prune ``W`` ``[out, in]`` to ``n:m`` and binarize what is kept; ``H`` ``[in, in]`` or ``None`` (data-free).

    ``spbo_steps``: τ (default ``m − n``; 0 = one-shot by OBS saliency). Without ``H``, :func:`spbo` on the
    whole weight (OBS saliency is then the magnitude, nothing to compensate). With ``H``, SPBO with data:
    step ``t`` is a compensated :func:`sweep` from the original ``W`` that prunes, on top of what step
    ``t − 1`` pruned, the weights of lowest ``Δ`` under levels fitted to what step ``t − 1`` binarized (the last
    step's levels are kept: its pushed errors assume them).
    """
    check_weight(W)
    out, cols = W.shape
    check_nm(n, m, cols, packed=False)
    sb = cols if scale_block is None else min(scale_block, cols)
    if sb < cols and (sb < 1 or sb % m) or compensation not in COMPENSATIONS or not set(extras) <= set(EXTRAS):
        raise ValueError(f"need scale_block a multiple of m = {m} (or None), compensation one of {COMPENSATIONS} "
                         f"and extras a subset of {EXTRAS}; got {scale_block}, {compensation!r}, {extras!r}")
    W = W.detach().float().clone()
    if H is None:
        if spbo_steps != 0:
            return BinarizedWeight(*spbo(W, n, m, scale_block=sb, steps=spbo_steps, rounds=refine_rounds), sb)
        mask = top_n(W.square(), n, m)
        return BinarizedWeight(mask, *fit_binary(W, mask, sb, rounds=refine_rounds), sb)
    check_weight(H, "H", square=cols)
    H = H.detach()
    perm = group_order(torch.diagonal(H).float(), m, sb) if "act_order" in extras else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    prep = prepare_hessian(H, damp)
    W[:, prep.dead] = 0.0
    v = 1.0 / torch.diagonal(prep.U).square()
    fit_w = (v if sb >= cols else v.sqrt()) if "obs_weights" in extras else None
    start = top_n(W.square() * v, n, m) if spbo_steps == 0 else torch.ones_like(W, dtype=torch.bool)
    _, alpha, mu = fit_binary(W, start, sb, rounds=refine_rounds, col_weight=fit_w)
    opts = dict(scale_block=sb, oneshot=spbo_steps == 0, compensation=compensation, block_size=block_size)
    mask, steps = torch.ones_like(W, dtype=torch.bool), [m - n] if spbo_steps == 0 else schedule(n, m, spbo_steps)
    for i, pruned in enumerate(steps):  # SPBO's steps
        mask, signs, arrived, _ = sweep(W, prep, m - pruned, m, levels=(alpha, mu), pruned=~mask, **opts)
        if i + 1 < len(steps):
            _, alpha, mu = fit_binary(arrived, mask, sb, rounds=refine_rounds, col_weight=fit_w)
    if "refit" in extras:  # least-squares levels, then every group's kept set re-chosen under them
        alpha, mu, error = refit(W, prep.H, mask, signs, alpha, mu, sb)
        again, again_signs, _, _ = sweep(W, prep, n, m, levels=(alpha, mu), pruned=torch.zeros_like(mask), **opts)
        a2, m2, error2 = refit(W, prep.H, again, again_signs, alpha, mu, sb)
        if error2 < error:
            mask, signs, alpha, mu = again, again_signs, a2, m2
    if perm is not None:
        mask, signs = mask[:, torch.argsort(perm)], signs[:, torch.argsort(perm)]
    return BinarizedWeight(mask, signs, alpha.contiguous(), mu.contiguous(), sb)


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
