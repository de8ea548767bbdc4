"""Converting linears: ``quantize_`` (atomic, reports what it did), the torchao handler, ``compress_weight``."""

from __future__ import annotations

import gc
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torchao.quantization.transform_module import register_quantize_module_handler

from . import observe
from .algorithms import BinarizedWeight, compress
from .config import CALIBRATED_ONLY, PBS2P
from .interop import RECORDED_CONFIG
from .tensor import BinarySparseTensor

log = logging.getLogger("pbs2p")

FilterFn = Callable[[torch.nn.Module, str], bool]


def is_linear(module: torch.nn.Module, name: str = "") -> bool:
    """The default filter: every ``nn.Linear``."""
    return isinstance(module, torch.nn.Linear)


def compress_weight(weight: torch.Tensor, config: PBS2P, hessian: torch.Tensor | None = None) -> BinarySparseTensor:
    """Compress one ``[out, in]`` float weight into a :class:`BinarySparseTensor` (``hessian=None``: data-free).

    Example:
        >>> import torch
        >>> from pbs2p import PBS2P, compress_weight
        >>> w = compress_weight(torch.randn(128, 64), PBS2P(n=4, m=8))
        >>> w.shape, w.nm(), round(w.bits_per_weight(), 3)
        (torch.Size([128, 64]), (4, 8), 2.375)
    """
    refuse_unused(config, calibrated=hessian is not None)
    return to_tensor(compress_parts(weight, config, hessian), config.n, config.m, weight.dtype)


def compress_parts(weight: torch.Tensor, config: PBS2P, hessian: torch.Tensor | None, n: int | None = None
                   ) -> BinarizedWeight:
    """The method's result for one weight (``n`` overrides ``config.n``: CFS's per-block N)."""
    return compress(weight.detach(), hessian, config.n if n is None else n, config.m, scale_block=config.scale_block,
                    spbo_steps=config.spbo_steps,
                    refine_rounds=config.refine_rounds, compensation=config.compensation, extras=config.extras)


def to_tensor(parts: BinarizedWeight, n: int, m: int, dtype: torch.dtype) -> BinarySparseTensor:
    """Pack the method's result (the one place weights are packed)."""
    return BinarySparseTensor.from_parts(parts.mask, parts.signs, parts.alpha, parts.mu, n=n, m=m,
                                         scale_block=parts.scale_block, dtype=dtype)


def refuse_unused(config: PBS2P, *, calibrated: bool) -> None:
    """Refuse options that compressing without a Hessian would silently ignore."""
    unused = [] if calibrated else config.non_default(CALIBRATED_ONLY)
    if unused:
        raise ValueError(f"PBS2P options {unused} act only with calibration data (pbs2p.calibrate, or "
                         "step='observe' then 'convert'); data-free conversion would ignore them")


TIED = "weight is tied to another module's (e.g. the input embedding); untie it to convert it"
HEAD = "the LM head (output embeddings) stays in full precision; select it with filter_fn to convert it"


def kept_weights(model: torch.nn.Module, filter_fn: FilterFn | None) -> dict[int, str]:
    """``id`` of every weight :func:`quantize_` leaves alone whatever the filter, with the reason: tied weights
    (held under more than one name), and, when no ``filter_fn`` is given, the LM head."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    kept = {key: TIED for key, count in seen.items() if count > 1}
    head = model.get_output_embeddings() if filter_fn is None and hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        kept.setdefault(id(head.weight), HEAD)
    return kept


def skip_reason(module: torch.nn.Module, config: PBS2P, parameter_name: str = "weight",
                kept: dict[int, str] | None = None) -> str | None:
    """Why ``module`` cannot be converted with ``config`` (``None`` if it can); ``kept``: see :func:`kept_weights`."""
    weight = getattr(module, parameter_name, None)
    if isinstance(weight, BinarySparseTensor):
        return "already converted"
    if not isinstance(module, torch.nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear (only linears are converted)"
    if not isinstance(weight, torch.Tensor):
        return f"has no tensor '{parameter_name}'"
    if kept and id(weight) in kept:
        return kept[id(weight)]
    if weight.dim() != 2 or weight.numel() == 0:
        return f"weight of shape {tuple(weight.shape)} is not a non-empty 2-D matrix"
    if not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.shape[1] % config.m:
        return f"in_features = {weight.shape[1]} is not a multiple of M = {config.m}"
    if weight.device.type == "meta":
        return "weight is on the meta device (no values to compress)"
    return None


def check_finite(name: str, weight: torch.Tensor, *, unchanged: str = "the model was left unchanged") -> None:
    """Raise ``ValueError`` naming the module if its weight holds NaN or Inf."""
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        raise ValueError(f"module '{name}' has {int(bad.sum())} NaN/Inf values in its weight; "
                         f"refusing to convert ({unchanged})")


@dataclass
class ConversionReport:
    """Which linears hold a :class:`~pbs2p.BinarySparseTensor`, which were skipped and why.

    Example:
        >>> import torch
        >>> from pbs2p import PBS2P, quantize_
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

    def kept_fraction(self) -> float:
        """Kept weights over all converted weights: the papers' "bits" (one bit per kept weight)."""
        return sum(w.numel() * w.n / w.m for _, w in self.converted) / max(self.num_weights, 1)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} linear(s) converted, {len(self.skipped)} skipped"]
        for name, w in self.converted:
            lines.append(f"  converted {name}: {tuple(w.shape)} {w.n}:{w.m}, {w.bits_per_weight():.3f} bits/weight")
        lines += [f"  skipped   {name}: {reason}" for name, reason in self.skipped]
        if self.converted:
            lines.append(f"  total: {self.packed_nbytes / 2**20:.2f} MiB, {self.bits_per_weight():.3f} bits/weight")
        return "\n".join(lines)


def conversion_report(model: torch.nn.Module, config: PBS2P | None = None,
                      filter_fn: FilterFn | None = None) -> ConversionReport:
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
    kept = kept_weights(model, filter_fn)
    for name, module in candidates(model, filter_fn or is_linear):
        weight = getattr(module, "weight", None)
        if isinstance(weight, BinarySparseTensor):
            report.converted.append((name, weight))
        else:
            report.skipped.append((name, skip_reason(module, config, kept=kept) or "not converted"))
    return report


def quantize_(model: torch.nn.Module, config: PBS2P, filter_fn: FilterFn | None = None) -> ConversionReport:
    """Convert ``model`` in place like ``torchao.quantization.quantize_``, atomically, and report what happened.

    Every selected linear is checked and compressed first; only then are the weights swapped, so a
    refusal or failure leaves the model as it was. ``filter_fn`` (default: every ``nn.Linear`` but a
    transformers model's LM head) selects what to convert; selecting anything but an ``nn.Linear`` is
    refused. Tied weights are skipped (never untied). A transformers model is marked as
    torchao-quantized, so ``save_pretrained`` writes the packed weights.

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
    refuse_unused(config, calibrated=config.step is not None)
    kept = kept_weights(model, filter_fn)
    selected = list(candidates(model, filter_fn or is_linear))
    others = [f"'{name}' ({type(mod).__name__})" for name, mod in selected if not isinstance(mod, torch.nn.Linear)]
    if others:
        raise ValueError(f"PBS2P converts nn.Linear weights only; filter_fn selected {', '.join(others)}: the model "
                         "was left unchanged")
    eligible = [(name, mod) for name, mod in selected if skip_reason(mod, config, kept=kept) is None]
    if config.step == "convert":
        eligible = [(name, mod) for name, mod in eligible if observe.observer(mod) is not None]
    chosen = {name for name, _ in eligible}
    for name, mod in selected:
        if name not in chosen:
            reason = skip_reason(mod, config, kept=kept) or "no observer (run step='observe' first)"
            log.info("skipped %s: %s", name, reason)
    if not eligible:
        raise ValueError(f"no linear of this {type(model).__name__} can be converted with {config.n}:{config.m} "
                         f"({len(selected)} module(s) selected, none eligible); the model was left unchanged")
    if config.step == "observe":
        for _, mod in eligible:
            observe.attach(mod, config)
    else:
        new = {}
        for name, mod in eligible:
            check_finite(name or type(mod).__name__, mod.weight)
            hessian = observe.check_convert(name, mod, config) if config.step == "convert" else None
            new[name] = to_tensor(compress_parts(mod.weight, config, hessian), config.n, config.m, mod.weight.dtype)
        for name, mod in eligible:  # nothing has changed so far: swap everything now
            _swap(mod, "weight", new[name], config)
            observe.detach(mod)
    report = conversion_report(model, config, filter_fn)
    if report.converted and config.step != "observe":
        from .interop import mark_hf_quantized

        mark_hf_quantized(model, config)
    return report


def candidates(model: torch.nn.Module, filter_fn: FilterFn) -> Iterator[tuple[str, torch.nn.Module]]:
    """Modules ``quantize_`` selects, in torchao's order (it does not descend into a match)."""

    def walk(module: torch.nn.Module, name: str) -> Iterator[tuple[str, torch.nn.Module]]:
        if filter_fn(module, name):
            yield name, module
            return
        for child_name, child in module.named_children():
            yield from walk(child, f"{name}.{child_name}" if name else child_name)

    yield from walk(model, "")


def _swap(module: torch.nn.Module, parameter_name: str, packed: BinarySparseTensor, config: PBS2P) -> None:
    setattr(module, parameter_name, torch.nn.Parameter(packed, requires_grad=False))
    setattr(module, RECORDED_CONFIG, config)  # what save_pretrained records (see pbs2p.interop.packed_configs)
    if not isinstance(module.__dict__.get("extra_repr"), types.MethodType):
        original = module.extra_repr
        module.extra_repr = types.MethodType(
            lambda self: f"{original()}, {parameter_name}={getattr(self, parameter_name)!r}", module)


def _held_elsewhere(module: torch.nn.Module, weight: torch.Tensor) -> bool:
    """Whether another module holds the same Parameter (tied weights), found from its referrers."""
    return any(isinstance(r, dict) and r is not module._parameters and any(v is weight for v in r.values())
               for r in gc.get_referrers(weight))


@register_quantize_module_handler(PBS2P)
def _pbs2p_transform(module: torch.nn.Module, config: PBS2P, *, parameter_name: str = "weight") -> torch.nn.Module:
    """The handler ``torchao.quantization.quantize_`` calls for each selected module (one at a time)."""
    refuse_unused(config, calibrated=config.step is not None)
    weight = getattr(module, parameter_name, None)
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"PBS2P converts nn.Linear weights only, not {type(module).__name__}({module.extra_repr()}), "
                         "which was left unchanged; leave it out of torchao's filter_fn / FqnToConfig")
    tied = {id(weight): TIED} if isinstance(weight, torch.Tensor) and _held_elsewhere(module, weight) else None
    reason = skip_reason(module, config, parameter_name, kept=tied)
    if reason is not None or (config.step == "convert" and observe.observer(module) is None):
        log.info("skipped %s: %s", type(module).__name__, reason or "no observer (run step='observe' first)")
        return module
    if config.step == "observe":
        observe.attach(module, config)
        return module
    label = f"{type(module).__name__}(in_features={weight.shape[1]}, out_features={weight.shape[0]})"
    check_finite(label, weight, unchanged="torchao's quantize_ converts module by module: this one is left as it "
                 "is, those before it are converted; pbs2p.quantize_ checks every linear first and changes nothing")
    hessian = observe.check_convert(label, module, config) if config.step == "convert" else None
    _swap(module, parameter_name, compress_weight(weight, config, hessian), config)
    observe.detach(module)
    return module


__all__ = ["ConversionReport", "compress_weight", "conversion_report", "quantize_"]
