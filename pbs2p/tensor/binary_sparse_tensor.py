"""``BinarySparseTensor``: a linear weight stored as packed 1-bit N:M codes plus per-row scales."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor, fill_defaults

from ..kernels import packing
from ..kernels.ops import bsp_linear, kernel_backend

aten = torch.ops.aten

__all__ = ["BinarySparseTensor"]


class BinarySparseTensor(TorchAOBaseTensor):
    """A ``[out_features, in_features]`` weight with 1-bit kept values and N:M sparsity, packed.

    ``W_hat[r, c] = kept[r, c] * (alpha[r, b] * sign[r, c] + mu[r, b])`` with ``b = c // scale_block``.

    Stored tensors (everything that is stored, and so everything :meth:`bits_per_weight` counts):

    * ``qdata``: ``uint8 [ceil(out / 64), in / m, 8 * (idx_bits + n)]``, the kept set of every group
      of ``m`` inputs as a combinatorial index (``ceil(log2 C(m, n))`` bits) and the signs of its
      ``n`` kept weights, for tiles of 64 rows (layout: :mod:`pbs2p.kernels.packing`);
    * ``scale`` (alpha) and ``zero_point`` (mu): ``[out, ceil(in / scale_block)]`` in the tensor's
      dtype; also readable as :attr:`alpha` and :attr:`mu`. (The torchao names let torchao's and
      transformers' safetensors code find the inner tensors.)

    The tensor's dtype is the dtype of its scales and of the computation: ``model.to(torch.bfloat16)``
    converts the scales and makes the linear compute in bf16. ``F.linear`` runs on the packed codes
    (the native CPU kernel where it is built, else the plain-torch path).

    Example:
        >>> import torch
        >>> from pbs2p import PBS2P, compress_weight
        >>> q = compress_weight(torch.randn(96, 64), PBS2P(n=6, m=8, scale_block=32))
        >>> q.qdata.dtype, tuple(q.scale.shape), (q.dequantize().reshape(96, 8, 8) != 0).sum(-1).unique().tolist()
        (torch.uint8, (96, 2), [6])
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(torch.nn.functional.linear(x, q), x @ q.dequantize().T, atol=1e-4)
        True

    Integrity: :attr:`checksum` is a digest of everything stored, computed when the tensor is saved
    (safetensors metadata, ``torch.save``) and verified when it is loaded, never on other constructions.
    """

    tensor_data_names = ["qdata", "scale", "zero_point"]
    tensor_attribute_names = ["n", "m", "scale_block", "format_version"]
    optional_tensor_attribute_names = ["transposed", "checksum"]

    def __new__(cls, qdata, scale, zero_point, n, m, scale_block, format_version, transposed=False, checksum=None):
        shape = (scale.shape[0], qdata.shape[1] * m)
        if transposed:
            shape = shape[::-1]
        if torch.is_inference_mode_enabled():
            # the wrapper is never an inference tensor: views of it (t(), detach(), a slice, what
            # nn.Parameter makes) need a version counter, which inference tensors refuse
            with torch.inference_mode(False):
                return torch.Tensor._make_wrapper_subclass(
                    cls, shape, dtype=scale.dtype, device=qdata.device, requires_grad=False
                )
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=scale.dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, zero_point, n, m, scale_block, format_version, transposed=False, checksum=None):
        _check_format(format_version)
        _check_consistent(qdata, scale, zero_point, n, m, scale_block)
        if checksum is not None:  # loading: verify what was stored
            _verify_checksum(qdata, scale, zero_point, n, m, scale_block, checksum)
        self.qdata = qdata
        self.scale = scale
        self.zero_point = zero_point
        self.n = n
        self.m = m
        self.scale_block = scale_block
        self.format_version = format_version
        self.transposed = bool(transposed)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_parts(
        cls,
        mask: torch.Tensor,
        signs: torch.Tensor,
        alpha: torch.Tensor,
        mu: torch.Tensor,
        *,
        n: int,
        m: int,
        scale_block: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> BinarySparseTensor:
        """Pack a bool N:M ``mask``, the bool ``signs`` (True = +1) of the kept weights and the scales.

        ``alpha`` and ``mu`` are ``[out, n_blocks]`` (or ``[out]`` for one pair per row); ``dtype``
        defaults to ``alpha``'s.
        """
        out, k = mask.shape
        scale_block = k if scale_block is None else scale_block
        n_blocks = -(-k // scale_block)
        if alpha.numel() != out * n_blocks or mu.numel() != out * n_blocks:
            raise ValueError(
                f"alpha and mu must be [{out}, {n_blocks}] for scale_block={scale_block}, "
                f"got {tuple(alpha.shape)} and {tuple(mu.shape)}"
            )
        alpha, mu = alpha.reshape(out, n_blocks), mu.reshape(out, n_blocks)
        if scale_block % m:
            raise ValueError(f"scale_block = {scale_block} is not a multiple of M = {m}")
        dtype = dtype or alpha.dtype
        check_finite_scales(alpha.to(dtype), mu.to(dtype))
        qdata = packing.pack(mask, signs, n, m)
        scale, zero_point = alpha.to(dtype).contiguous(), mu.to(dtype).contiguous()
        return cls(qdata, scale, zero_point, n, m, scale_block, packing.FORMAT_VERSION)

    # ----------------------------------------------------------------- inspection
    @property
    def alpha(self) -> torch.Tensor:
        """Per-row (per-block) magnitude of the kept weights (stored as ``scale``)."""
        return self.scale

    @property
    def mu(self) -> torch.Tensor:
        """Per-row (per-block) shift of the kept weights (stored as ``zero_point``)."""
        return self.zero_point

    def nm(self) -> tuple[int, int]:
        """The sparsity pattern ``(n, m)``: ``n`` of every ``m`` consecutive inputs are kept."""
        return self.n, self.m

    @property
    def is_2of4(self) -> bool:
        """True when exactly 2 of every 4 inputs are kept (the sparsity NVIDIA's sparse tensor cores run)."""
        return (self.n, self.m) == (2, 4)

    def packed_nbytes(self) -> int:
        """Bytes of everything stored: codes (tile padding included) and scales."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero_point))

    def bits_per_weight(self) -> float:
        """Every stored bit (signs, kept-set indices, tile padding, scales) over the number of weights
        (``nan`` for an empty tensor, e.g. ``w[10:5]``)."""
        return 8 * self.packed_nbytes() / self.numel() if self.numel() else float("nan")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight this tensor represents (zeros where pruned)."""
        w = packing.dequantize(self.qdata, self.scale, self.zero_point, self.n, self.m, self.scale_block, dtype)
        return w.t() if self.transposed else w

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bool N:M ``mask`` and ``signs`` (True = +1 where kept), ``[out, in]`` each."""
        return packing.unpack(self.qdata, self.n, self.m, self.scale.shape[0])

    @property
    def checksum(self) -> str | None:
        """Digest of everything stored, computed now (``None`` for tensors without host data, e.g. fake)."""
        if any(type(t) is not torch.Tensor or t.device.type == "meta" for t in _parts(self)[:3]):
            return None
        return content_checksum(*_parts(self))

    def __tensor_flatten__(self):  # the checksum is not part of what compiled code sees
        return list(self.tensor_data_names), {a: getattr(self, a) for a in (*self.tensor_attribute_names, "transposed")}

    @classmethod
    def __tensor_unflatten__(cls, tensor_data_dict, tensor_attributes, outer_size, outer_stride):
        return cls(*(tensor_data_dict[t] for t in cls.tensor_data_names),
                   *(tensor_attributes[a] for a in (*cls.tensor_attribute_names, "transposed")))

    def _apply_fn_to_data(self, fn):
        return BinarySparseTensor(*(fn(t) for t in (self.qdata, self.scale, self.zero_point)), self.n, self.m,
                                  self.scale_block, self.format_version, self.transposed)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "checksum": self.checksum}

    def _stable_hash_for_caching(self) -> str:
        """Key for torch.compile's caches: everything the compiled code depends on, not the values.

        That includes the compute path (:func:`~pbs2p.kernels.ops.kernel_backend`): code compiled while the
        native operator was loaded calls it, so a process that runs the torch path (``PBS2P_KERNEL=torch``,
        a failed build) must not reuse it from a shared ``TORCHINDUCTOR_CACHE_DIR``.
        """
        inner = ",".join(f"{tuple(t.shape)}:{t.dtype}" for t in (self.qdata, self.scale, self.zero_point))
        layout = f"v{self.format_version}/{self.n}:{self.m}/{self.scale_block}/{self.transposed}"
        return f"BinarySparseTensor/{layout}/{inner}/{kernel_backend()}"

    def __repr__(self) -> str:
        bits = f"{self.bits_per_weight():.3f}" if self.numel() else "n/a (empty)"
        return (
            f"{type(self).__name__}({self.n}:{self.m}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"scale_block={self.scale_block}, bits_per_weight={bits}"
            f"{', transposed' if self.transposed else ''})"
        )


def _check_format(version: int) -> None:
    if version != packing.FORMAT_VERSION:
        raise ValueError(
            f"this BinarySparseTensor was written in packed format version {version}; this pbs2p reads "
            f"version {packing.FORMAT_VERSION} only. Re-compress the model with this pbs2p version."
        )


def _check_consistent(qdata, scale, zero_point, n, m, scale_block) -> None:
    """Refuse inner tensors that do not fit together (a tampered or truncated checkpoint)."""
    packing.check_nm(n, m)
    out = scale.shape[0] if scale.dim() == 2 else -1
    k = qdata.shape[1] * m if qdata.dim() == 3 else -1
    problems = []
    if qdata.dtype != torch.uint8 or qdata.dim() != 3 or qdata.shape[2] != packing.nm_tables(n, m).block_bytes:
        problems.append(
            f"qdata {qdata.dtype} {tuple(qdata.shape)} is not uint8 [tiles, groups, "
            f"{packing.nm_tables(n, m).block_bytes}]"
        )
    elif out >= 0 and qdata.shape[0] != packing.padded_rows(out) // packing.TILE_ROWS:
        problems.append(f"qdata has {qdata.shape[0]} row tiles, {out} rows need {packing.padded_rows(out) // 64}")
    if not (isinstance(scale_block, int) and scale_block > 0 and scale_block % m == 0):
        problems.append(f"scale_block {scale_block!r} is not a positive multiple of {m}")
    elif k >= 0 and (scale.shape != zero_point.shape or scale.shape[1:] != (-(-k // scale_block),)):
        problems.append(
            f"scale {tuple(scale.shape)} / zero_point {tuple(zero_point.shape)} do not match "
            f"{k} inputs in blocks of {scale_block}"
        )
    if not (scale.dtype.is_floating_point and zero_point.dtype == scale.dtype):
        problems.append(f"scale/zero_point dtypes {scale.dtype}/{zero_point.dtype} are not one float dtype")
    if problems:
        raise ValueError("inconsistent BinarySparseTensor (tampered or truncated?): " + "; ".join(problems))


def check_finite_scales(alpha: torch.Tensor, mu: torch.Tensor) -> None:
    """Refuse NaN or Inf scales when packing (the weight would compute NaN wherever it is used).

    >>> check_finite_scales(torch.tensor([[1.0], [float("nan")]]), torch.zeros(2, 1))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the scales computed for this weight are not finite ...
    """
    if alpha.device.type == "meta" or type(alpha) is not torch.Tensor:
        return
    bad_alpha, bad_mu = int((~torch.isfinite(alpha)).sum()), int((~torch.isfinite(mu)).sum())
    if bad_alpha or bad_mu:
        raise ValueError(
            f"the scales computed for this weight are not finite ({bad_alpha} of {alpha.numel()} alpha values and "
            f"{bad_mu} of {mu.numel()} mu values are NaN/Inf). From a finite weight this means its values are too "
            "large for the method's float32 arithmetic (about 1e36 and above): scale the weight down (and the "
            "layer's output up) before compressing it"
        )


def content_checksum(qdata, scale, zero_point, n, m, scale_block) -> str:
    """A 64-bit BLAKE2b digest of everything stored (bytes of the three tensors and the layout)."""
    digest = hashlib.blake2b(f"{n}:{m}:{scale_block}:{scale.dtype}".encode(), digest_size=8)
    for t in (qdata, scale, zero_point):
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _verify_checksum(qdata, scale, zero_point, n, m, scale_block, expected: str) -> None:
    """Refuse content that does not match the stored digest (skipped for tensors without host data)."""
    if any(type(t) is not torch.Tensor or t.device.type == "meta" for t in (qdata, scale, zero_point)):
        return
    actual = content_checksum(qdata, scale, zero_point, n, m, scale_block)
    if expected != actual:
        raise ValueError("BinarySparseTensor content does not match its checksum (tampered or corrupted "
                         f"checkpoint): stored {expected}, computed {actual}")


def _setstate(self: BinarySparseTensor, state: dict) -> None:
    """Unpickling (``torch.load``): refuse incompatible formats and damaged content before use."""
    state = dict(state)
    expected = state.pop("checksum", None)
    torch._utils._set_obj_state(self, state)
    _check_format(getattr(self, "format_version", None))
    if "transposed" not in self.__dict__:
        self.transposed = False
    _check_consistent(self.qdata, self.scale, self.zero_point, self.n, self.m, self.scale_block)
    if expected is None:
        raise ValueError("this pickled BinarySparseTensor has no checksum (written by another tool or edited); "
                         "refusing to load it")
    _verify_checksum(*_parts(self), expected)


# TorchAOBaseTensor.__init_subclass__ installs its own __setstate__; ours adds the format check.
BinarySparseTensor.__setstate__ = _setstate

implements = BinarySparseTensor.implements
implements_torch_function = BinarySparseTensor.implements_torch_function


def _linear(x: torch.Tensor, w: BinarySparseTensor, bias: torch.Tensor | None) -> torch.Tensor:
    if w.transposed:
        raise ValueError("F.linear needs the weight as [out, in]; got a transposed BinarySparseTensor")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    return bsp_linear(x, w.qdata, w.scale, w.zero_point, bias, w.n, w.m, w.scale_block)


@implements_torch_function(F.linear)
@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w, bias = fill_defaults(args, 3, [None])
    return _linear(x, w, bias)


@implements(aten.t.default)
def _(func, types, args, kwargs):
    w = args[0]
    out = BinarySparseTensor(
        w.qdata, w.scale, w.zero_point, w.n, w.m, w.scale_block, w.format_version, not w.transposed
    )
    return return_and_correct_aliasing(func, args, kwargs, out)


@implements(aten.mm.default)
def _(func, types, args, kwargs):
    x, wt = args
    return _linear(x, _untransposed(wt), None)


@implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, x, wt = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        raise NotImplementedError("BinarySparseTensor supports addmm only with beta = alpha = 1")
    return _linear(x, _untransposed(wt), bias)


def _untransposed(wt: BinarySparseTensor) -> BinarySparseTensor:
    if not isinstance(wt, BinarySparseTensor) or not wt.transposed:
        raise NotImplementedError("BinarySparseTensor supports x @ W.t() only (the weight as right operand)")
    return BinarySparseTensor(
        wt.qdata, wt.scale, wt.zero_point, wt.n, wt.m, wt.scale_block, wt.format_version, False
    )


# aten.to.* are composite ops that autograd decomposes into _to_copy; in inference_mode (no autograd
# keys) they reach this class as they are, so each overload is implemented here too.
@implements([aten._to_copy.default, aten.to.dtype_layout, aten.to.dtype, aten.to.device, aten.to.other,
             aten.type_as.default])
def _(func, types, args, kwargs):
    w = args[0]
    bound = {**dict(zip((a.name for a in func._schema.arguments), args, strict=False)), **kwargs}
    other = bound.get("other")
    device = other.device if other is not None else bound.get("device") or w.device
    dtype = other.dtype if other is not None else bound.get("dtype") or w.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"a BinarySparseTensor cannot become {dtype}; its dtype is the float dtype of its scales")
    copy = func is aten._to_copy.default or bool(bound.get("copy"))
    if not copy and torch.device(device) == w.device and dtype == w.dtype:
        return w  # aten.to without a change returns the tensor itself
    out = BinarySparseTensor(
        w.qdata.to(device, copy=copy),
        w.scale.to(device=device, dtype=dtype, copy=copy),
        w.zero_point.to(device=device, dtype=dtype, copy=copy),
        w.n,
        w.m,
        w.scale_block,
        w.format_version,
        w.transposed,
    )
    return return_and_correct_aliasing(func, args, {}, out) if func is aten._to_copy.default else out


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    dst, src = args[:2]
    same_layout = isinstance(src, BinarySparseTensor) and all(
        getattr(dst, a) == getattr(src, a) for a in ("n", "m", "scale_block", "format_version", "transposed")
    )
    if not same_layout or any(
        getattr(dst, t).shape != getattr(src, t).shape for t in BinarySparseTensor.tensor_data_names
    ):
        raise ValueError(f"cannot copy {src!r} into {dst!r}: the packed layouts differ")
    for name in BinarySparseTensor.tensor_data_names:
        getattr(dst, name).copy_(getattr(src, name))
    return dst


def _parts(w: BinarySparseTensor) -> tuple:
    return w.qdata, w.scale, w.zero_point, w.n, w.m, w.scale_block


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    w, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
    if w.transposed:
        raise NotImplementedError("slicing a transposed BinarySparseTensor is not supported")
    if dim != 0 or step != 1:
        raise NotImplementedError("BinarySparseTensor can be sliced on the output dimension (dim 0, step 1) only")
    rows = w.shape[0]
    start, end = slice(start, end).indices(rows)[:2]
    end = max(start, end)
    alpha, mu = w.scale[start:end], w.zero_point[start:end]
    tile = packing.TILE_ROWS
    if start % tile == 0 and (end % tile == 0 or end == rows):
        codes = w.qdata[start // tile : -(-end // tile)]
        out = BinarySparseTensor(codes, alpha, mu, w.n, w.m, w.scale_block, w.format_version)
    else:  # not tile-aligned: repack the rows
        mask, signs = w.unpack()
        codes = packing.pack(mask[start:end], signs[start:end], w.n, w.m)
        out = BinarySparseTensor(codes, alpha, mu, w.n, w.m, w.scale_block, w.format_version)
    return return_and_correct_aliasing(func, args, kwargs, out)


@implements(aten.narrow.default)
def _(func, types, args, kwargs):
    w, dim, start, length = args[:4]
    return aten.slice.Tensor(w, dim, start, start + length)


@implements(aten.matmul.default)
def _(func, types, args, kwargs):  # x @ W.t() reaches here as it is in inference_mode (composite op)
    x, wt = args
    if isinstance(x, BinarySparseTensor):
        raise NotImplementedError("BinarySparseTensor supports x @ W.t() only (the weight as right operand)")
    return _linear(x, _untransposed(wt), None)


@implements(aten.equal.default)
def _(func, types, args, kwargs):
    a, b = args[:2]
    if not (isinstance(a, BinarySparseTensor) and isinstance(b, BinarySparseTensor)):
        return False
    same_layout = all(getattr(a, k) == getattr(b, k) for k in ("n", "m", "scale_block", "format_version", "transposed"))
    return same_layout and all(torch.equal(getattr(a, t), getattr(b, t)) for t in BinarySparseTensor.tensor_data_names)
