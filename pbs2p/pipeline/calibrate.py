"""``calibrate``: PBS²P on a whole causal LM, block by block, with CFS's per-block N (the paper's pipeline)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..algorithms import allocate_n
from ..config import PBS2P
from ..interop import mark_hf_quantized
from ..quantize import HEAD, ConversionReport, compress_parts, conversion_report, skip_reason, to_tensor
from .checkpoint import Checkpoint
from .scale_tuning import ScaleTuning
from .sequential import BlockRecord, Compressed, SequentialRunner
from .text import refuse_text

log = logging.getLogger("pbs2p")


@dataclass(frozen=True)
class CFS:
    """CFS's coarse search (§3.3): each decoder block keeps its own N, from the cosine similarity of the
    block's input and output (redundant blocks keep fewer weights); the average kept fraction is exactly
    ``n / m``.

    Args:
        n_low, n_high: bounds of a block's N (default ``n - 1`` and ``n + 1``, within ``[1, m - 1]``).
        normalize: ``"mean"`` or ``"median"`` of the blocks' importances ``1/c`` (see
            :func:`pbs2p.algorithms.layer_importance`).
        samples: calibration samples the cosine similarities are measured on.

    Example:
        >>> from pbs2p import CFS
        >>> CFS().bounds(4, 8), CFS(n_low=3, n_high=7).bounds(5, 8)
        ((3, 5), (3, 7))
        >>> CFS().bounds(2, 4)
        (1, 3)
    """

    n_low: int | None = None
    n_high: int | None = None
    normalize: str = "mean"
    samples: int = 8

    def __post_init__(self) -> None:
        for name in ("n_low", "n_high", "samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"CFS.{name} must be an int >= 1, got {value!r}")
        if self.samples is None or self.normalize not in ("mean", "median"):
            raise ValueError(f"CFS.samples must be set and CFS.normalize 'mean' or 'median', got {self}")

    def bounds(self, n: int, m: int) -> tuple[int, int]:
        """``(n_low, n_high)`` for target ``n`` of ``m``, with the defaults filled in and checked."""
        low = max(1, n - 1) if self.n_low is None else self.n_low
        high = min(m - 1, n + 1) if self.n_high is None else self.n_high
        if not 1 <= low <= n <= high <= m - 1:
            raise ValueError(f"CFS needs 1 <= n_low <= n <= n_high <= m - 1, got n_low={low}, n={n}, n_high={high}")
        return low, high


@dataclass
class CalibrationResult:
    """What :func:`calibrate` did: the conversion report, one :class:`BlockRecord` per block, the time, and
    for a :class:`~pbs2p.Checkpoint` the folder written (its report's weights are shape-only meta tensors).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from pbs2p import CFS, PBS2P, calibrate
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> result = calibrate(LlamaForCausalLM(cfg), torch.randint(0, 128, (2, 16)), PBS2P(n=6, m=8),
        ...                    cfs=CFS(n_low=5, n_high=7), progress=False)
        >>> result.report.kept_fraction(), [b.n for b in result.blocks] in ([5, 7], [6, 6], [7, 5])
        (0.75, True)
        >>> sorted(result.blocks[0].errors)[:3]
        ['mlp.down_proj', 'mlp.gate_proj', 'mlp.up_proj']
    """

    report: ConversionReport
    blocks: list[BlockRecord] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    folder: Path | None = None


def eligible_linears(block: torch.nn.Module, config: PBS2P) -> dict[str, torch.nn.Linear]:
    """The linears of ``block`` that ``config`` can convert, by name inside the block (a block on the meta
    device, still on disk, is judged by everything but its values)."""
    return {name: mod for name, mod in block.named_modules()
            if isinstance(mod, torch.nn.Linear) and _convertible(mod, config)}


def _convertible(linear: torch.nn.Linear, config: PBS2P) -> bool:
    reason = skip_reason(linear, config)
    # skip_reason checks the meta device last: a meta weight with that reason passed every other check
    return reason is None or (linear.weight.device.type == "meta" and reason.startswith("weight is on the meta"))


@torch.no_grad()
def calibrate(
    model: torch.nn.Module | Checkpoint,
    calibration: torch.Tensor,
    config: PBS2P | None = None,
    *,
    cfs: CFS | None | str = "auto",
    true_sequential: bool = True,
    tuning: ScaleTuning | None = ScaleTuning(),
    batch_size: int = 4,
    progress: bool = True,
    device: torch.device | str | None = None,
    group=None,
) -> CalibrationResult:
    """Compress every linear of ``model``'s decoder blocks with PBS²P on ``calibration`` tokens.

    Args:
        model: a transformers causal LM (LLaMA, Qwen2, Gemma3, OPT, GPT-2, ... families), or a
            :class:`~pbs2p.Checkpoint`: a model folder read one block at a time and written to another.
        calibration: ``LongTensor [nsamples, seqlen]`` of token ids; make them from raw text, a text file, a
            list of strings or a dataset with :func:`pbs2p.calibration_tokens` (text given here is refused).
        config: the weight format and per-weight method (default ``PBS2P()``); ``config.n`` is the
            target N (per block with ``cfs``).
        cfs: CFS's per-block N (:class:`CFS`), or ``None`` for ``config.n`` in every block. ``"auto"``
            (default): ``CFS()`` for ``m >= 8``, ``None`` for ``m = 4``, whose 2:4 is a hardware pattern that a
            block of 1:4 or 3:4 would not match (pass a ``CFS`` to vary N there too).
        true_sequential: compress a block's linears in stages (q/k/v, o, gate/up, down), each on inputs
            that pass through the already-compressed stages (beyond the paper); ``False``: every linear's
            inputs from the block before any of its linears is compressed.
        tuning: :class:`ScaleTuning` of each block's scales on its output (beyond the paper), or ``None``.
        batch_size: samples per forward call.
        progress: show a progress bar.
        device: the compute device (default: the model's; a checkpoint's: the CPU). An in-memory
            model elsewhere stays where it is: each block is copied to ``device`` to be compressed and
            gets its packed weights back on the model's device.
        group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``) whose
            ranks split the calibration batches and all-reduce the Hessians (``pbs2p.pipeline.ranks``);
            every rank gets the same compressed model. ``None``: this process alone.

    Embeddings, the final norm and the LM head stay in full precision. The model is changed in
    place, and only if the whole run succeeds: refusals (empty calibration, NaN/Inf weights) happen
    before anything is changed, and any failure (or interruption) puts every original weight back.
    A :class:`~pbs2p.Checkpoint` is only read; its output folder appears only when the run succeeds.

    Memory: an in-memory model is held whole, as given. A checkpoint holds one block at a time (in the
    checkpoint's dtype or ``Checkpoint.dtype``, on ``device``), plus the embeddings while the inputs are
    captured, and the activations of the calibration batches (offloaded to the CPU or to disk when
    they do not fit on the device). Hessians are accumulated in float64 (float32 products) whatever
    the model's dtype.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from pbs2p import PBS2P, calibrate
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> result = calibrate(model, torch.randint(0, 128, (4, 32)), PBS2P(n=4, m=8), progress=False)
        >>> len(result.report.converted), result.report.kept_fraction()
        (14, 0.5)
    """
    refuse_text(calibration)
    config = PBS2P() if config is None else config
    if not isinstance(config, PBS2P) or config.step is not None:
        raise ValueError(f"calibrate takes a PBS2P with step=None, got {config!r}")
    if cfs == "auto":
        cfs = CFS() if config.m >= 8 else None
    for name, value, kind in (("cfs", cfs, CFS), ("tuning", tuning, ScaleTuning)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"calibrate's {name} must be a {kind.__name__} or None, got {value!r}")
    bounds = cfs.bounds(config.n, config.m) if cfs is not None else None
    start = time.perf_counter()
    model_arg = model
    runner = SequentialRunner(model, calibration, batch_size, device=device, group=group)
    model = runner.model
    try:
        targets = [eligible_linears(block, config) for block in runner.blocks]
        if not any(targets):
            raise ValueError(f"no linear in the decoder blocks can be converted with {config.n}:{config.m}")
        cosines = runner.block_cosines(cfs.samples) if cfs is not None else None
        ns = _allocate(config, cfs, bounds, targets, cosines)

        def compress(i: int, name: str, linear: torch.nn.Linear, hessian: torch.Tensor):
            parts = compress_parts(linear.weight, config, hessian, n=ns[i])
            return Compressed.from_parts(to_tensor(parts, ns[i], config.m, linear.weight.dtype), parts)

        records = runner.compress(targets, compress, ns=ns, cosines=cosines, progress=progress,
                                  desc="PBS²P blocks", true_sequential=true_sequential, tuning=tuning)
        if isinstance(model_arg, Checkpoint):  # its config.json is written now
            mark_hf_quantized(model, config)
        runner.finish()
    except BaseException:
        runner.restore()
        raise
    for record in records:
        log.info("block %d: N=%d, relative output errors %s", record.index, record.n,
                 {k: round(v, 4) for k, v in record.errors.items()})
    report = conversion_report(model, config)
    outside = "outside the decoder blocks (kept in full precision)"
    report.skipped = [(name, outside if why in ("not converted", HEAD) or why.startswith("weight is on the meta")
                       else why) for name, why in report.skipped]
    mark_hf_quantized(model, config)
    folder = Path(model_arg.out) if isinstance(model_arg, Checkpoint) else None
    return CalibrationResult(report, records, time.perf_counter() - start, calibration.numel(), folder)


def _allocate(config: PBS2P, cfs: CFS | None, bounds: tuple[int, int] | None,
              targets: list[dict[str, torch.nn.Linear]], cosines: list[float] | None) -> list[int]:
    """CFS coarse: per-block N from the cosine similarities, exact weighted average (or ``n`` everywhere)."""
    if cfs is None or cosines is None:
        return [config.n] * len(targets)
    sizes = [sum(lin.weight.numel() for lin in linears.values()) for linears in targets]
    present = [i for i, size in enumerate(sizes) if size]
    ns = allocate_n([cosines[i] for i in present], config.n, config.m, *bounds, [sizes[i] for i in present],
                    normalize=cfs.normalize)
    allocation = [config.n] * len(targets)
    for i, n in zip(present, ns, strict=True):
        allocation[i] = n
    return allocation
