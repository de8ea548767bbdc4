"""Output-aware refit of the scales: the least-squares ``α, μ`` for fixed mask and signs under ``H``.

For row ``r`` with kept indicator ``k`` and signed indicator ``b = k·(±1)``, and scale blocks ``1..K``,
``Ŵ_r = Σ_k α_rk·b_r[k] + μ_rk·k_r[k]`` is linear in ``θ_r = (α_r1..α_rK, μ_r1..μ_rK)``, so the output
error ``(w_r − Ŵ_r) H (w_r − Ŵ_r)ᵀ`` is a ``2K``-variable quadratic: solve ``G_r θ_r = g_r`` for every row.
It is the exact minimiser of the layer's output error for the chosen mask and signs, so it can only
lower it (a row whose solution has some ``α < 0`` keeps its previous scales). Cost: one ``[out, in] ×
[in, in]`` product per kind of design column (two per block pair row), i.e. about two matmuls.

Example:
    >>> import torch
    >>> from pbs2p.algorithms.binarize import fit_binary
    >>> W, X = torch.randn(4, 16), torch.randn(64, 16)
    >>> H = 2 * X.T @ X / 64
    >>> mask = torch.ones(4, 16, dtype=torch.bool)
    >>> signs, a0, m0 = fit_binary(W, mask, 16)
    >>> a1, m1 = hessian_refit_levels(W, H, mask, signs, a0, m0, 16)
    >>> a1.shape, bool((a1 >= 0).all())
    (torch.Size([4, 1]), True)
"""

from __future__ import annotations

import math

import torch


def _quadratic_error(wHw: torch.Tensor, G: torch.Tensor, g: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-row ``(w − Ŵ(θ)) H (w − Ŵ(θ))ᵀ = wHw − 2θᵀg + θᵀGθ`` (float64)."""
    return wHw - 2.0 * (theta * g).sum(1) + (theta.unsqueeze(1) @ G @ theta.unsqueeze(2)).reshape(-1)


def hessian_refit_levels(
    W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor,
    mu: torch.Tensor, scale_block: int, *, ridge: float = 1e-8, return_error: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, float]:
    """Return ``(alpha, mu)`` minimising ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` for fixed ``mask, signs``.

    Rows whose optimum has a negative ``α`` (or is not finite), or whose error would not decrease,
    keep the given ``alpha, mu``. With ``return_error`` also the resulting ``tr((W − Ŵ) H (W − Ŵ)ᵀ)``.
    The three ``[out, in] × [in, in]`` products run in float32; the small systems, the error
    bookkeeping (from the same quadratic form, no further products) and the solves in float64.
    """
    out, cols = W.shape
    sb = min(scale_block, cols)
    nb = math.ceil(cols / sb)
    Hf = H.float()
    Wf = W.float()
    kf = mask.float()
    bf = torch.where(signs, 1.0, -1.0) * kf
    ZW = Wf @ Hf  # rows of W·H (H symmetric)
    wHw = (ZW * Wf).double().sum(1)
    G = torch.zeros(out, 2 * nb, 2 * nb, dtype=torch.float64, device=W.device)
    g = torch.zeros(out, 2 * nb, dtype=torch.float64, device=W.device)
    for i in range(nb):
        si = slice(i * sb, min((i + 1) * sb, cols))
        zb = bf[:, si] @ Hf[si, :]  # [out, in]
        zk = kf[:, si] @ Hf[si, :]
        g[:, i] = (bf[:, si] * ZW[:, si]).double().sum(1)
        g[:, nb + i] = (kf[:, si] * ZW[:, si]).double().sum(1)
        for j in range(nb):
            sj = slice(j * sb, min((j + 1) * sb, cols))
            G[:, i, j] = (zb[:, sj] * bf[:, sj]).double().sum(1)
            G[:, i, nb + j] = (zb[:, sj] * kf[:, sj]).double().sum(1)
            G[:, nb + i, j] = (zk[:, sj] * bf[:, sj]).double().sum(1)
            G[:, nb + i, nb + j] = (zk[:, sj] * kf[:, sj]).double().sum(1)
    G = 0.5 * (G + G.transpose(1, 2))
    scale = torch.diagonal(G, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    eye = torch.eye(2 * nb, dtype=torch.float64, device=W.device)
    theta, info = torch.linalg.solve_ex(G + ridge * scale.view(-1, 1, 1) * eye, g)
    ok = (info == 0) & torch.isfinite(theta).all(1) & (theta[:, :nb] >= 0).all(1)
    old = torch.cat([alpha.double().reshape(out, nb), mu.double().reshape(out, nb)], 1)
    theta = torch.where(ok.unsqueeze(1), theta, old)
    # never return something worse than what we were given (same quadratic form, float64)
    old_err = _quadratic_error(wHw, G, g, old)
    new_err = _quadratic_error(wHw, G, g, theta)
    better = new_err <= old_err
    theta = torch.where(better.unsqueeze(1), theta, old)
    new_a, new_m = theta[:, :nb].float(), theta[:, nb:].float()
    if return_error:
        return new_a, new_m, float(torch.where(better, new_err, old_err).clamp_min(0).sum())
    return new_a, new_m
