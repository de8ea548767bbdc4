"""The result type of every PBS²P compressor and honest storage accounting.

``Ŵ = mask ⊙ (α·(2·signs − 1) + μ)`` with one ``(α, μ)`` pair per output row and per block of
``scale_block`` consecutive input columns.

Example:
    >>> import torch
    >>> from pbs2p.algorithms import compress_weight
    >>> bw = compress_weight(torch.randn(4, 16), n=2, m=4)
    >>> bw.dequantize().shape, bw.mask.view(4, 4, 4).sum(-1).unique().tolist()
    (torch.Size([4, 16]), [2])
    >>> round(bw.bits_per_weight(), 4)  # (3-bit index + 2 signs) / 4 + 2 fp32 scales / 16 columns
    5.25
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def expand_blocks(t: torch.Tensor, scale_block: int, in_features: int) -> torch.Tensor:
    """Broadcast per-block values ``[out, n_blocks]`` to per-column values ``[out, in]``."""
    if t.shape[1] == 1:
        return t.expand(t.shape[0], in_features)
    return t.repeat_interleave(scale_block, dim=1)[:, :in_features]


def dequantize_parts(
    mask: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, scale_block: int
) -> torch.Tensor:
    """``mask ⊙ (α·(2·signs − 1) + μ)`` in float32 (the function behind ``BinarizedWeight.dequantize``)."""
    cols = mask.shape[1]
    a = expand_blocks(alpha.float(), scale_block, cols)
    u = expand_blocks(mu.float(), scale_block, cols)
    pm1 = signs.float() * 2.0 - 1.0
    return torch.where(mask, a * pm1 + u, torch.zeros((), dtype=torch.float32, device=mask.device))


def nm_index_bits(n: int, m: int) -> int:
    """Bits of the combinatorial index of an n-of-m kept set: ``ceil(log2 C(m, n))``."""
    return math.ceil(math.log2(math.comb(m, n))) if math.comb(m, n) > 1 else 0


def honest_bits_per_weight(
    n: int, m: int, in_features: int, scale_block: int | None = None, *, scale_bits: int = 32,
    scales_per_block: int = 2, mask_format: str = "index",
) -> float:
    """Every stored bit over the number of weights, for an N:M binarized layer.

    Per M-group: the kept set (``"index"``: ``ceil(log2 C(m, n))`` bits; ``"bitmap"``: ``m`` bits) and
    ``n`` sign bits. Per row and scale block: ``scales_per_block`` values (α, μ) of ``scale_bits`` each.

    >>> round(honest_bits_per_weight(4, 8, 576), 4)  # 11/8 + 64/576
    1.4861
    """
    if mask_format not in ("index", "bitmap"):
        raise ValueError(f"mask_format must be 'index' or 'bitmap', got {mask_format!r}")
    sb = in_features if scale_block is None else min(scale_block, in_features)
    n_blocks = math.ceil(in_features / sb)
    mask_bits = nm_index_bits(n, m) if mask_format == "index" else m
    if n == m:
        mask_bits = 0
    per_group = mask_bits + n
    return per_group / m + n_blocks * scales_per_block * scale_bits / in_features


@dataclass
class BinarizedWeight:
    """A 1-bit, N:M-sparse weight: mask, signs and per-(row, block) scale ``alpha`` and offset ``mu``.

    Attributes:
        mask: bool ``[out, in]``; exactly ``n`` True in every group of ``m`` consecutive inputs of a row.
        signs: bool ``[out, in]``; True = +1, False = −1; False wherever ``mask`` is False.
        alpha: float32 ``[out, n_blocks]``, ``alpha >= 0``.
        mu: float32 ``[out, n_blocks]``.
        scale_block: columns per scale block; ``n_blocks = ceil(in / scale_block)``.
        n, m: the N:M pattern (``None`` when unknown, e.g. built by hand).
    """

    mask: torch.Tensor
    signs: torch.Tensor
    alpha: torch.Tensor
    mu: torch.Tensor
    scale_block: int
    n: int | None = None
    m: int | None = None

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.mask.shape[1] / self.scale_block)

    def dequantize(self) -> torch.Tensor:
        """Dense float32 ``Ŵ = mask ⊙ (α·(2·signs − 1) + μ)``."""
        return dequantize_parts(self.mask, self.signs, self.alpha, self.mu, self.scale_block)

    def bits_per_weight(self, *, scale_bits: int = 32, mask_format: str = "index") -> float:
        """Honest storage cost (see :func:`honest_bits_per_weight`); needs ``n`` and ``m``."""
        if self.n is None or self.m is None:
            raise ValueError("bits_per_weight needs the N:M pattern; construct with n= and m=")
        return honest_bits_per_weight(
            self.n, self.m, self.mask.shape[1], self.scale_block, scale_bits=scale_bits,
            mask_format=mask_format,
        )
