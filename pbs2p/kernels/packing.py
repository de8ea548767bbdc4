"""The packed 1-bit N:M weight format: bit layout, packing and unpacking in plain torch.

Layout (format version 1) of a weight with ``out`` rows and ``K = G * m`` columns:

* Rows are cut into tiles of ``TILE_ROWS = 64`` rows (the last tile is padded with zero codes;
  the padding is stored and therefore counted in the bit budget).
* Every row is cut into ``G = K / m`` groups of ``m`` consecutive columns; exactly ``n`` weights of a
  group are kept. A group is stored as two fields:

  - ``idx``: the rank of its kept set among all ``C(m, n)`` kept sets, listed in increasing order of
    the set's bitmask (bit ``j`` = column ``j`` of the group); ``ceil(log2 C(m, n))`` bits;
  - ``signs``: ``n`` bits, bit ``j`` is the sign of the ``j``-th kept weight in ascending column
    order (1 = +1, 0 = -1).

* ``codes`` is a ``uint8`` tensor ``[tiles, G, 8 * (idx_bits + n)]``. The block ``codes[t, g]`` holds
  the 64 ``idx`` fields of the tile's rows for group ``g`` (``8 * idx_bits`` bytes), then their 64
  ``signs`` fields (``8 * n`` bytes). Fields are bit-packed little-endian: field ``r`` of width ``w``
  occupies bits ``[r*w, (r+1)*w)`` of its area, bit ``b`` being bit ``b % 8`` of byte ``b // 8``.

A group therefore costs ``idx_bits + n`` bits: 11 bits for 4:8, 5:8 and 6:8 (1.375 bits/weight) and
5 bits for 2:4 (1.25 bits/weight), before the per-row (or per-row-per-block) scales.
Rows tile-major and groups contiguous inside a tile let a kernel decode 64 rows of one group with a
few vector instructions while the activations of that group stay in registers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

TILE_ROWS = 64
FORMAT_VERSION = 1
SUPPORTED_M = (4, 8, 16)


@dataclass(frozen=True)
class NMTables:
    """Lookup tables of one N:M pattern family (cached per ``(n, m)``)."""

    n: int
    m: int
    idx_bits: int
    masks: torch.Tensor  # int64 [C]: bitmask of every kept set, increasing
    rank_of_mask: torch.Tensor  # int64 [2**m]: index of a bitmask in `masks`, -1 if not n bits set
    kept: torch.Tensor  # bool [C, m]: column j of the group is kept
    sign_rank: torch.Tensor  # int64 [C, m]: rank of column j among the kept ones (0 where not kept)

    @property
    def block_bytes(self) -> int:
        """Bytes of one ``(tile, group)`` block: 64 idx fields and 64 sign fields."""
        return TILE_ROWS * (self.idx_bits + self.n) // 8

    @property
    def group_bits(self) -> int:
        """Bits per group of ``m`` weights, scales excluded."""
        return self.idx_bits + self.n


def check_nm(n: int, m: int, in_features: int | None = None, *, packed: bool = True) -> None:
    """Raise unless ``n:m`` is a pattern this format stores (``packed``) or the method accepts.

    ``packed``: ``m`` is one of :data:`SUPPORTED_M` and ``1 <= n < m``. Otherwise (the compression
    algorithms, which also binarize without pruning) ``1 <= n <= m``. With ``in_features``, it must
    be a multiple of ``m``. Non-integers (``bool`` included) raise ``TypeError``.

    >>> check_nm(4, 8)
    >>> check_nm(8, 8)
    Traceback (most recent call last):
    ...
    ValueError: N:M = 8:8 is not a sparsity pattern: need 1 <= N < M
    """
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
        raise TypeError(f"N and M must be integers, got N={n!r}, M={m!r}")
    if packed and m not in SUPPORTED_M:
        raise ValueError(f"M = {m} is not supported: M must be one of {SUPPORTED_M}")
    if not (1 <= n < m if packed else 1 <= n <= m):
        raise ValueError(f"N:M = {n}:{m} is not a sparsity pattern: need 1 <= N {'<' if packed else '<='} M")
    if in_features is not None and in_features % m:
        raise ValueError(f"in_features = {in_features} is not a multiple of M = {m}")


def index_bits(n: int, m: int) -> int:
    """Bits of the combinatorial index of an ``n``-of-``m`` kept set: ``ceil(log2 C(m, n))`` (0 if ``n = m``).

    >>> index_bits(4, 8), index_bits(2, 4), index_bits(8, 8)
    (7, 3, 0)
    """
    return math.ceil(math.log2(math.comb(m, n)))


@functools.cache
def nm_tables(n: int, m: int) -> NMTables:
    """Tables for ``n``-of-``m`` kept sets, shared by packing, unpacking and the kernels.

    >>> t = nm_tables(2, 4)
    >>> t.masks.tolist(), t.idx_bits, t.group_bits
    ([3, 5, 6, 9, 10, 12], 3, 5)
    """
    check_nm(n, m)
    masks = [s for s in range(1 << m) if s.bit_count() == n]
    idx_bits = index_bits(n, m)
    rank_of_mask = torch.full((1 << m,), -1, dtype=torch.int64)
    rank_of_mask[torch.tensor(masks)] = torch.arange(len(masks))
    bits = torch.tensor([[(s >> j) & 1 for j in range(m)] for s in masks], dtype=torch.int64)
    sign_rank = (torch.cumsum(bits, dim=1) - 1).clamp(min=0) * bits
    return NMTables(n, m, idx_bits, torch.tensor(masks), rank_of_mask, bits.bool(), sign_rank)


def padded_rows(out_features: int) -> int:
    """Rows actually stored: ``out_features`` rounded up to a whole tile."""
    return -(-out_features // TILE_ROWS) * TILE_ROWS


def _pack_fields(values: torch.Tensor, width: int) -> torch.Tensor:
    """Bit-pack integer fields ``[..., 64]`` of ``width`` bits into bytes ``[..., 8 * width]``."""
    shifts = torch.arange(width, device=values.device)
    bits = (values.unsqueeze(-1) >> shifts) & 1  # [..., 64, width]
    bits = bits.flatten(-2).unflatten(-1, (-1, 8))  # [..., 8*width, 8]
    weights = 1 << torch.arange(8, device=values.device)
    return (bits * weights).sum(-1).to(torch.uint8)


def _unpack_fields(area: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_pack_fields`: bytes ``[..., 8 * width]`` to int64 fields ``[..., 64]``."""
    shifts = torch.arange(8, device=area.device)
    bits = (area.to(torch.int64).unsqueeze(-1) >> shifts) & 1  # [..., 8*width, 8]
    bits = bits.flatten(-2).unflatten(-1, (TILE_ROWS, width))
    return (bits << torch.arange(width, device=area.device)).sum(-1)


def pack(mask: torch.Tensor, signs: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pack a boolean N:M ``mask`` and the ``signs`` of the kept weights into ``codes``.

    ``mask`` and ``signs`` are bool ``[out, K]``; ``signs`` is read only where ``mask`` is set.

    >>> mask = torch.tensor([[True, False, True, False]])
    >>> signs = torch.tensor([[True, False, False, False]])
    >>> pack(mask, signs, 2, 4).shape
    torch.Size([1, 1, 40])
    """
    tables = nm_tables(n, m)
    if mask.dim() != 2 or mask.shape != signs.shape:
        raise ValueError(
            f"mask and signs must be 2-D and alike, got {tuple(mask.shape)} and {tuple(signs.shape)}"
        )
    if mask.dtype != torch.bool or signs.dtype != torch.bool:
        raise TypeError(f"mask and signs must be bool tensors, got {mask.dtype} and {signs.dtype}")
    out, k = mask.shape
    if k % m:
        raise ValueError(f"in_features = {k} is not a multiple of M = {m}")
    groups = mask.reshape(out, k // m, m).to(torch.int64)
    counts = groups.sum(-1)
    if bool((counts != n).any()):
        bad = int((counts != n).nonzero()[0, 0])
        raise ValueError(
            f"mask row {bad} has a group with {int(counts[bad].max())} kept weights, N = {n} required"
        )
    col = torch.arange(m, device=mask.device)
    bitmask = (groups << col).sum(-1)
    idx = tables.rank_of_mask.to(mask.device)[bitmask]
    rank = (torch.cumsum(groups, -1) - 1).clamp(min=0)
    sgn = ((signs.reshape(out, k // m, m) & mask.reshape(out, k // m, m)).to(torch.int64) << rank).sum(-1)
    pad = padded_rows(out) - out
    idx = torch.nn.functional.pad(idx, (0, 0, 0, pad)).reshape(-1, TILE_ROWS, k // m).transpose(1, 2)
    sgn = torch.nn.functional.pad(sgn, (0, 0, 0, pad)).reshape(-1, TILE_ROWS, k // m).transpose(1, 2)
    return torch.cat([_pack_fields(idx, tables.idx_bits), _pack_fields(sgn, n)], dim=-1).contiguous()


def unpack_fields(codes: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``idx`` and ``signs`` fields of every (padded row, group): int64 ``[rows_padded, G]`` each."""
    tables = nm_tables(n, m)
    if codes.dim() != 3 or codes.shape[-1] != tables.block_bytes:
        raise ValueError(
            f"codes of shape {tuple(codes.shape)} do not hold {n}:{m} blocks of {tables.block_bytes} bytes"
        )
    split = 8 * tables.idx_bits
    idx = _unpack_fields(codes[..., :split], tables.idx_bits)  # [T, G, 64]
    sgn = _unpack_fields(codes[..., split:], n)
    return idx.transpose(1, 2).flatten(0, 1), sgn.transpose(1, 2).flatten(0, 1)


def unpack(codes: torch.Tensor, n: int, m: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: bool ``mask`` and ``signs`` of shape ``[out_features, K]``.

    >>> mask = torch.tensor([[True, False, True, False]])
    >>> signs = torch.tensor([[True, False, False, False]])
    >>> m2, s2 = unpack(pack(mask, signs, 2, 4), 2, 4, 1)
    >>> bool((m2 == mask).all() and (s2 == signs).all())
    True
    """
    ternary = unpack_ternary(codes, n, m, out_features)
    return ternary != 0, ternary > 0


def unpack_ternary(codes: torch.Tensor, n: int, m: int, out_features: int) -> torch.Tensor:
    """The kept weights' signs as an int8 ``[out_features, K]`` tensor in {-1, 0, +1} (torch ops only)."""
    tables = nm_tables(n, m)
    idx, sgn = unpack_fields(codes, n, m)
    idx, sgn = idx[:out_features], sgn[:out_features]
    kept = _constant(tables.kept, codes)[idx]  # [out, G, m]
    rank = _constant(tables.sign_rank, codes)[idx]
    positive = ((sgn.unsqueeze(-1) >> rank) & 1).bool()
    ternary = kept.to(torch.int8) * (positive.to(torch.int8) * 2 - 1)
    return ternary.flatten(1)


def _constant(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table`` on ``like``'s device; rebuilt from its values while tracing (fake tensors reject real ones)."""
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor:
        return torch.tensor(table.tolist(), dtype=table.dtype, device=like.device)
    return table.to(like.device)


def expand_scales(scale: torch.Tensor, scale_block: int, in_features: int) -> torch.Tensor:
    """Repeat per-block values ``[out, n_blocks]`` to one value per column ``[out, in_features]``."""
    if scale.shape[1] == 1:
        return scale.expand(scale.shape[0], in_features)
    return scale.repeat_interleave(scale_block, dim=1)[:, :in_features]


def dense(ternary: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, scale_block: int,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W_hat = kept * (alpha * sign + mu)`` from the kept weights' signs ``ternary`` in {-1, 0, +1}."""
    k = ternary.shape[1]
    dtype = dtype or alpha.dtype
    a = expand_scales(alpha.to(dtype), scale_block, k)
    b = expand_scales(mu.to(dtype), scale_block, k)
    return ternary.ne(0).to(dtype) * (a * ternary.to(dtype) + b)


def dequantize(
    codes: torch.Tensor,
    alpha: torch.Tensor,
    mu: torch.Tensor,
    n: int,
    m: int,
    scale_block: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense weight ``W_hat = mask * (alpha * sign + mu)`` from the packed fields (plain torch, compilable)."""
    return dense(unpack_ternary(codes, n, m, alpha.shape[0]), alpha, mu, scale_block, dtype)
