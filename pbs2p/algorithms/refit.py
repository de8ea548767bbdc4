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

from .binarized import dequantize_parts


def _row_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    E = (W - W_hat).double()
    return ((E @ H) * E).sum(1)


def hessian_refit_levels(
    W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor,
    mu: torch.Tensor, scale_block: int, *, ridge: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(alpha, mu)`` minimising ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` for fixed ``mask, signs``.

    Rows whose optimum has a negative ``α`` (or is not finite), or whose error would not decrease,
    keep the given ``alpha, mu``.
    """
    out, cols = W.shape
    sb = min(scale_block, cols)
    nb = math.ceil(cols / sb)
    Hd = H.double()
    Wd = W.double()
    kf = mask.double()
    bf = torch.where(signs, 1.0, -1.0).double() * kf
    G = torch.zeros(out, 2 * nb, 2 * nb, dtype=torch.float64, device=W.device)
    g = torch.zeros(out, 2 * nb, dtype=torch.float64, device=W.device)
    for i in range(nb):
        si = slice(i * sb, min((i + 1) * sb, cols))
        zb = bf[:, si] @ Hd[si, :]  # [out, in]
        zk = kf[:, si] @ Hd[si, :]
        g[:, i] = (zb * Wd).sum(1)
        g[:, nb + i] = (zk * Wd).sum(1)
        for j in range(nb):
            sj = slice(j * sb, min((j + 1) * sb, cols))
            G[:, i, j] = (zb[:, sj] * bf[:, sj]).sum(1)
            G[:, i, nb + j] = (zb[:, sj] * kf[:, sj]).sum(1)
            G[:, nb + i, j] = (zk[:, sj] * bf[:, sj]).sum(1)
            G[:, nb + i, nb + j] = (zk[:, sj] * kf[:, sj]).sum(1)
    scale = torch.diagonal(G, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    eye = torch.eye(2 * nb, dtype=torch.float64, device=W.device)
    theta, info = torch.linalg.solve_ex(G + ridge * scale.view(-1, 1, 1) * eye, g)
    new_a = theta[:, :nb].float()
    new_m = theta[:, nb:].float()
    ok = (info == 0) & torch.isfinite(theta).all(1) & (new_a >= 0).all(1)
    new_a = torch.where(ok.unsqueeze(1), new_a, alpha.float())
    new_m = torch.where(ok.unsqueeze(1), new_m, mu.float())
    # guard against numerical trouble: never return something worse than what we were given
    old_err = _row_error(W, dequantize_parts(mask, signs, alpha, mu, sb), Hd)
    new_err = _row_error(W, dequantize_parts(mask, signs, new_a, new_m, sb), Hd)
    better = (new_err <= old_err).unsqueeze(1)
    return torch.where(better, new_a, alpha.float()), torch.where(better, new_m, mu.float())
