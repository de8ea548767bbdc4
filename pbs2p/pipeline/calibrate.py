"""``calibrate``: compress a causal LM block by block on calibration tokens (the paper's pipeline).

Each decoder block is compressed with the Hessians of its linears' inputs, where those inputs come
from the already-compressed blocks before it; only one block's activations are held at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..algorithms import HessianAccumulator, allocate_n, relative_output_error
from ..config import PBS2P
from ..quantize import ConversionReport, check_finite, compress_to_tensor, conversion_report, skip_reason
from .families import decoder_blocks, is_conv1d, linears_as_nn_linear

log = logging.getLogger("pbs2p")


@dataclass
class BlockRecord:
    """What happened to one decoder block."""

    index: int
    n: int
    cosine: float | None  # cosine similarity of the block's input and output (CFS), if measured
    errors: dict[str, float]  # linear name -> ||(W - W_hat) X|| / ||W X|| on the calibration inputs
    seconds: float


@dataclass
class CalibrationResult:
    """The conversion report plus one :class:`BlockRecord` per decoder block."""

    report: ConversionReport
    blocks: list[BlockRecord] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def mean_kept_fraction(self) -> float:
        """Kept weights over all weights of the converted linears (exact, from the masks' N)."""
        kept = sum(w.numel() * w.n / w.m for _, w in self.report.converted)
        return kept / max(self.report.num_weights, 1)


class _Stop(Exception):
    """Raised inside the last block to end the capture forward early (skips norm and LM head)."""


@dataclass
class _BlockCall:
    """The positional and keyword arguments the model passes to one block, besides the hidden states."""

    args: tuple
    kwargs: dict


def _capture(model: torch.nn.Module, blocks: torch.nn.ModuleList, chunk: torch.Tensor):
    """Hidden states entering block 0 and every block's other arguments, for one batch of tokens."""
    calls: list[_BlockCall] = []
    first: list[torch.Tensor] = []
    originals = [block.forward for block in blocks]

    def recorder(i: int):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                first.append(hidden_states)
            calls.append(_BlockCall(args, kwargs))
            if i == len(blocks) - 1:
                raise _Stop
            return hidden_states

        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        model(chunk, use_cache=False)
    except _Stop:
        pass
    finally:
        for block, forward in zip(blocks, originals, strict=True):
            block.forward = forward
    if len(calls) != len(blocks):
        raise RuntimeError(f"captured {len(calls)} block calls for {len(blocks)} blocks")
    return first[0], calls


def _run(block: torch.nn.Module, hidden: list[torch.Tensor], calls: list[_BlockCall]) -> list[torch.Tensor]:
    outputs = []
    for x, call in zip(hidden, calls, strict=True):
        out = block(x, *call.args, **call.kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _eligible(block: torch.nn.Module, config: PBS2P) -> dict[str, torch.nn.Linear]:
    return {
        name: mod
        for name, mod in block.named_modules()
        if isinstance(mod, torch.nn.Linear) and skip_reason(mod, config) is None
    }


def _cosine(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    sims = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean() for a, b in zip(inputs, outputs)]
    return float(torch.stack(sims).mean())


def _chunks(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    yield from tokens.split(batch_size)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    config: PBS2P,
    *,
    batch_size: int = 4,
    cfs_samples: int = 8,
    progress: bool = True,
) -> CalibrationResult:
    """Compress every linear of ``model``'s decoder blocks with PBS²P on ``calibration`` tokens.

    Args:
        model: a transformers causal LM (LLaMA, Qwen2, Gemma3, OPT, GPT-2, ... families).
        calibration: ``LongTensor [nsamples, seqlen]`` of token ids.
        config: the method's settings; ``config.n`` is the target N (per block with ``config.cfs``).
        batch_size: samples per forward call.
        cfs_samples: calibration samples used to measure the blocks' cosine similarities (CFS).
        progress: show a progress bar.

    Embeddings, the final norm and the LM head stay in full precision. The model is changed in
    place; refusals (empty calibration, NaN/Inf weights) happen before anything is changed.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from pbs2p import PBS2P, calibrate
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> result = calibrate(model, torch.randint(0, 128, (4, 32)), PBS2P(n=4, m=8), progress=False)
        >>> len(result.report.converted), result.mean_kept_fraction()
        (14, 0.5)
    """
    if config.step is not None:
        raise ValueError(f"calibrate takes a PBS2P with step=None, got step={config.step!r}")
    if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and calibration.numel() > 0):
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a non-empty LongTensor [nsamples, seqlen], got {shape}")
    if calibration.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calibration must hold token ids (int64), got {calibration.dtype}")
    start = time.perf_counter()
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            weight = getattr(mod, "weight", None)
            if (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)) and weight.dtype.is_floating_point:
                check_finite(f"block {i}: {name}", weight)
    for block in blocks:
        linears_as_nn_linear(block)
    targets = [_eligible(block, config) for block in blocks]
    if not any(targets):
        raise ValueError(f"no linear in the decoder blocks can be converted with {config.n}:{config.m}")
    device = next(model.parameters()).device
    calibration = calibration.to(device)

    captured = [_capture(model, blocks, chunk) for chunk in _chunks(calibration, batch_size)]
    hidden = [h for h, _ in captured]
    calls_per_block = [[calls[i] for _, calls in captured] for i in range(len(blocks))]

    cosines = _block_cosines(blocks, hidden, calls_per_block, cfs_samples, batch_size) if config.cfs else None
    ns = _allocate(config, targets, cosines)

    result = CalibrationResult(report=ConversionReport(), tokens=calibration.numel())
    bar = tqdm(list(enumerate(blocks)), desc="PBS²P blocks", disable=not progress)
    for i, block in bar:
        t0 = time.perf_counter()
        linears = targets[i]
        hessians = _collect_hessians(block, linears, hidden, calls_per_block[i])
        errors = {}
        for name, lin in linears.items():
            H = hessians[name]
            packed = compress_to_tensor(lin.weight, config, H, n=ns[i])
            errors[name] = relative_output_error(lin.weight.float(), packed.dequantize(torch.float32), H)
            lin.weight = torch.nn.Parameter(packed, requires_grad=False)
        del hessians
        hidden = _run(block, hidden, calls_per_block[i])
        cosine = None if cosines is None else cosines[i]
        result.blocks.append(BlockRecord(i, ns[i], cosine, errors, time.perf_counter() - t0))
        worst = max(errors.values(), default=0.0)
        bar.set_postfix(n=ns[i], worst_err=f"{worst:.3f}")
        log.info("block %d: N=%d, relative output errors %s", i, ns[i], {k: round(v, 4) for k, v in errors.items()})
    report = conversion_report(model, config)
    outside = "outside the decoder blocks (kept in full precision)"
    report.skipped = [(name, outside if reason == "not converted" else reason) for name, reason in report.skipped]
    result.report = report
    result.seconds = time.perf_counter() - start
    return result


def _collect_hessians(
    block: torch.nn.Module, linears: dict[str, torch.nn.Linear], hidden: list[torch.Tensor], calls: list[_BlockCall]
) -> dict[str, torch.Tensor]:
    """``H = 2XXᵀ/n`` of every linear's input; linears fed the same tensor (q/k/v, gate/up) share one."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        lin.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
        for name, lin in linears.items()
    ]
    owner: dict[str, str] = {}
    accumulators: dict[str, HessianAccumulator] = {}
    try:
        for x, call in zip(hidden, calls, strict=True):
            block(x, *call.args, **call.kwargs)
            if not owner:  # first batch: group the linears by the identity of their input tensor
                for name, tensor in seen.items():
                    owner[name] = next((o for o in owner.values() if seen[o] is tensor), name)
            for name in {owner[name] for name in seen}:
                accumulators.setdefault(name, HessianAccumulator(linears[name].in_features, x.device)).add(seen[name])
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - set(owner))
    if missing:
        raise RuntimeError(f"linears {missing} were not called in their block's forward")
    return {name: accumulators[owner[name]].hessian() for name in linears}


def _block_cosines(blocks, hidden, calls_per_block, samples: int, batch_size: int) -> list[float]:
    """Cosine similarity of every block's input and output, the full-precision model on a few samples."""
    take = max(1, -(-samples // batch_size))
    x = hidden[:take]
    cosines = []
    for block, calls in zip(blocks, calls_per_block, strict=True):
        y = _run(block, x, calls[:take])
        cosines.append(_cosine(x, y))
        x = y
    return cosines


def _allocate(config: PBS2P, targets: list[dict[str, torch.nn.Linear]], cosines: list[float] | None) -> list[int]:
    if cosines is None:
        return [config.n] * len(targets)
    low, high = config.n_bounds()
    sizes = [sum(lin.weight.numel() for lin in linears.values()) for linears in targets]
    present = [i for i, size in enumerate(sizes) if size]
    ns = allocate_n(
        [cosines[i] for i in present], config.n, config.m, low, high, [sizes[i] for i in present]
    )
    allocation = [config.n] * len(targets)
    for i, n in zip(present, ns, strict=True):
        allocation[i] = n
    return allocation
