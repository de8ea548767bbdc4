"""The ``quantize_`` handler of :class:`~pbs2p.PBS2P`, and what was converted or skipped and why."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torchao.quantization import quantize_ as _torchao_quantize_
from torchao.quantization.quant_api import _is_linear
from torchao.quantization.transform_module import register_quantize_module_handler

from .algorithms import compress_weight
from .config import PBS2P
from .observe import attach_observer, observed_tokens, pop_hessian
from .tensor import BinarySparseTensor

log = logging.getLogger("pbs2p")

FilterFn = Callable[[torch.nn.Module, str], bool]


def tied_weight_ids(model: torch.nn.Module) -> set[int]:
    """``id`` of every parameter that ``model`` holds under more than one name (tied weights)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, count in counts.items() if count > 1}


def skip_reason(
    module: torch.nn.Module, config: PBS2P, parameter_name: str = "weight", tied: set[int] | None = None
) -> str | None:
    """Why ``module`` cannot be converted with ``config`` (``None`` if it can).

    ``tied``: ids of the model's tied parameters (:func:`tied_weight_ids`). A weight shared with another
    module (e.g. an LM head tied to the input embedding) is left as it is: converting it would untie
    it and store the matrix twice; untie it first to compress it.
    """
    weight = getattr(module, parameter_name, None)
    if isinstance(weight, BinarySparseTensor):
        return "already converted"
    if not isinstance(weight, torch.Tensor):
        return f"has no tensor '{parameter_name}'"
    if tied and id(weight) in tied:
        return "weight is tied to another module's (e.g. the input embedding); untie it to convert it"
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not 2-D"
    if not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.shape[1] % config.m:
        return f"in_features = {weight.shape[1]} is not a multiple of M = {config.m}"
    if weight.device.type == "meta":
        return "weight is on the meta device (no values to compress)"
    return None


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the module if its weight holds NaN or Inf."""
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        raise ValueError(
            f"module '{name}' has {int(bad.sum())} NaN/Inf values in its weight; "
            "refusing to convert (the model was left unchanged)"
        )


@dataclass
class ConversionReport:
    """Which linears hold a :class:`~pbs2p.BinarySparseTensor`, which were skipped and why.

    Example:
        >>> import torch
        >>> from pbs2p import PBS2P, conversion_report, quantize_
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 5), torch.nn.Linear(5, 3))
        >>> report = quantize_(model, PBS2P(n=4, m=8))
        >>> [name for name, _ in report.converted], report.skipped
        (['0', '1'], [('2', 'in_features = 5 is not a multiple of M = 8')])
    """

    converted: list[tuple[str, BinarySparseTensor]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def packed_nbytes(self) -> int:
        """Bytes stored by all converted weights."""
        return sum(w.packed_nbytes() for _, w in self.converted)

    @property
    def num_weights(self) -> int:
        """Number of weights of all converted linears."""
        return sum(w.numel() for _, w in self.converted)

    def bits_per_weight(self) -> float:
        """Every stored bit of the converted weights over their number of weights."""
        return 8 * self.packed_nbytes / max(self.num_weights, 1)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} linear(s) converted, {len(self.skipped)} skipped"]
        for name, w in self.converted:
            lines.append(f"  converted {name}: {tuple(w.shape)} {w.n}:{w.m}, {w.bits_per_weight():.3f} bits/weight")
        lines += [f"  skipped   {name}: {reason}" for name, reason in self.skipped]
        if self.converted:
            lines.append(f"  total: {self.packed_nbytes / 2**20:.2f} MiB, {self.bits_per_weight():.3f} bits/weight")
        return "\n".join(lines)


def conversion_report(
    model: torch.nn.Module, config: PBS2P | None = None, filter_fn: FilterFn | None = None
) -> ConversionReport:
    """Report every linear of ``model`` as converted, or skipped with the reason.

    Example:
        >>> import torch
        >>> from pbs2p import conversion_report
        >>> print(conversion_report(torch.nn.Sequential(torch.nn.Linear(12, 4))))
        0 linear(s) converted, 1 skipped
          skipped   0: in_features = 12 is not a multiple of M = 8
    """
    config = config or PBS2P()
    report = ConversionReport()
    tied = tied_weight_ids(model)
    for name, module in _candidates(model, filter_fn or _is_linear):
        weight = getattr(module, "weight", None)
        if isinstance(weight, BinarySparseTensor):
            report.converted.append((name, weight))
        else:
            report.skipped.append((name, skip_reason(module, config, tied=tied) or "not converted"))
    return report


def quantize_(model: torch.nn.Module, config: PBS2P, filter_fn: FilterFn | None = None) -> ConversionReport:
    """Convert ``model`` in place like ``torchao.quantization.quantize_``, and report what happened.

    Refuses (and leaves the model unchanged) when no linear can be converted or a weight holds
    NaN/Inf. Skipped linears are listed with the reason in the returned report. A transformers
    model is marked as torchao-quantized, so ``save_pretrained`` writes the packed weights.

    Example:
        >>> import torch
        >>> from pbs2p import PBS2P, quantize_
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> report = quantize_(model, PBS2P(n=2, m=4))
        >>> print(report)  # doctest: +ELLIPSIS
        2 linear(s) converted, 0 skipped
          converted 0: (128, 256) 2:4, 1.500 bits/weight
          converted 2: (10, 128) 2:4, 8.500 bits/weight
          total: ...
    """
    if not isinstance(config, PBS2P):
        raise TypeError(f"config must be a PBS2P, got {type(config).__name__}")
    filter_fn = filter_fn or _is_linear
    candidates = list(_candidates(model, filter_fn))
    tied = tied_weight_ids(model)
    if config.step != "convert" and not any(skip_reason(mod, config, tied=tied) is None for _, mod in candidates):
        raise ValueError(
            f"no linear of this {type(model).__name__} can be converted with {config.n}:{config.m} "
            f"({len(candidates)} linear(s) found, none eligible); the model was left unchanged"
        )
    try:
        _torchao_quantize_(model, config, filter_fn=filter_fn)
    finally:
        _TIED.clear()
    report = conversion_report(model, config, filter_fn)
    if report.converted and config.step is None:
        from .interop import mark_hf_quantized

        mark_hf_quantized(model, config)
    return report


def _candidates(model: torch.nn.Module, filter_fn: FilterFn) -> Iterator[tuple[str, torch.nn.Module]]:
    """Modules ``quantize_`` hands to the handler, in its order (it does not descend into a match)."""

    def walk(module: torch.nn.Module, name: str) -> Iterator[tuple[str, torch.nn.Module]]:
        if filter_fn(module, name):
            yield name, module
            return
        for child_name, child in module.named_children():
            yield from walk(child, f"{name}.{child_name}" if name else child_name)

    yield from walk(model, "")


def _torchao_call() -> tuple[torch.nn.Module | None, FilterFn | None, str | None]:
    """The root model, filter and current module name of the running ``torchao`` ``quantize_`` call.

    torchao passes the handler only the module. Its caller frames hold the module's name and the root
    model; reading them lets a refusal name the module and happen before any module is changed.
    Returns ``(None, None, None)`` when the handler is called some other way.
    """
    name = None
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if name is None and code.co_name == "_replace_with_custom_fn_if_matches_filter":
            name = frame.f_locals.get("cur_fqn", "")[:-1]
        if code.co_name == "quantize_" and "torchao" in code.co_filename:
            return frame.f_locals.get("model"), frame.f_locals.get("filter_fn"), name
        frame = frame.f_back
    return None, None, name


_TIED: set[int] = set()  # tied parameter ids of the model of the running quantize_ call


def _validate_model_once(module: torch.nn.Module, config: PBS2P) -> str:
    """On the first module of a ``quantize_`` call, check every module it will touch; return the name."""
    root, filter_fn, name = _torchao_call()
    if root is None or filter_fn is None:
        _TIED.clear()
        return name or type(module).__name__
    first = next(_candidates(root, filter_fn), None)  # only the first module's call walks the whole model
    if first is not None and first[1] is module:
        _TIED.clear()
        _TIED.update(tied_weight_ids(root))
        for cand_name, cand in _candidates(root, filter_fn):
            label = cand_name or type(cand).__name__
            if config.step == "convert" and observed_tokens(cand) == 0:
                raise ValueError(
                    f"module '{label}' saw no calibration input between step='observe' and step='convert'; "
                    "refusing to convert (the model was left unchanged)"
                )
            if skip_reason(cand, config, tied=_TIED) is None and config.step != "observe":
                check_finite(label, cand.weight)
    return name or type(module).__name__


@register_quantize_module_handler(PBS2P)
def _pbs2p_transform(module: torch.nn.Module, config: PBS2P, *, parameter_name: str = "weight") -> torch.nn.Module:
    name = _validate_model_once(module, config)
    if config.step == "convert" and getattr(module, "_pbs2p_observer", None) is None:
        log.info("skipped %s: no observer attached (run quantize_ with step='observe' first)", name)
        return module
    reason = skip_reason(module, config, parameter_name, tied=_TIED)
    if reason is not None:
        log.info("skipped %s: %s", name, reason)
        return module
    if config.step == "observe":
        attach_observer(module)
        return module
    weight = getattr(module, parameter_name)
    check_finite(name, weight)
    hessian = pop_hessian(module) if config.step == "convert" else None
    packed = compress_to_tensor(weight, config, hessian)
    setattr(module, parameter_name, torch.nn.Parameter(packed, requires_grad=False))
    module.extra_repr = types.MethodType(_extra_repr(module.extra_repr, parameter_name), module)
    log.debug("converted %s: %r", name, packed)
    return module


def compress_to_tensor(
    weight: torch.Tensor, config: PBS2P, hessian: torch.Tensor | None = None, n: int | None = None
) -> BinarySparseTensor:
    """Compress one weight with ``config`` (``n`` overrides ``config.n``, e.g. CFS's per-layer N)."""
    n = config.n if n is None else n
    result = compress_weight(
        weight.detach(),
        hessian,
        n=n,
        m=config.m,
        scale_block=config.scale_block,
        method=config.method,
        block_size=config.block_size,
        compensation=config.compensation,
        spbo_steps=None if n != config.n else config.spbo_steps,
        refine_rounds=config.refine_rounds,
        damp=config.damp,
        seed=config.seed,
    )
    return BinarySparseTensor.from_parts(
        result.mask,
        result.signs,
        result.alpha,
        result.mu,
        n=n,
        m=config.m,
        scale_block=result.scale_block,
        dtype=weight.dtype,
    )


def _extra_repr(original: Callable[[], str], parameter_name: str) -> Callable[[torch.nn.Module], str]:
    def extra_repr(self: torch.nn.Module) -> str:
        return f"{original()}, {parameter_name}={getattr(self, parameter_name)!r}"

    return extra_repr
