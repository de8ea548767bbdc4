"""``calibrate``: PBS²P on a whole causal LM, block by block, with CFS's per-block N (the paper's pipeline)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..algorithms import allocate_n
from ..config import PBS2P
from ..interop import mark_hf_quantized
from ..quantize import ConversionReport, compress_to_tensor, conversion_report, skip_reason
from .sequential import BlockRecord, SequentialRunner

log = logging.getLogger("pbs2p")


@dataclass
class CalibrationResult:
    """What :func:`calibrate` did: the conversion report, one :class:`BlockRecord` per block, the time.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from pbs2p import PBS2P, calibrate
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> config = PBS2P(n=6, m=8, n_low=5, n_high=7)
        >>> result = calibrate(LlamaForCausalLM(cfg), torch.randint(0, 128, (2, 16)), config, progress=False)
        >>> result.mean_kept_fraction(), [b.n for b in result.blocks] in ([5, 7], [6, 6], [7, 5])
        (0.75, True)
        >>> sorted(result.blocks[0].errors)[:3]
        ['mlp.down_proj', 'mlp.gate_proj', 'mlp.up_proj']
    """

    report: ConversionReport
    blocks: list[BlockRecord] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def mean_kept_fraction(self) -> float:
        """Kept weights over all weights of the converted linears (exact, from each tensor's N)."""
        kept = sum(w.numel() * w.n / w.m for _, w in self.report.converted)
        return kept / max(self.report.num_weights, 1)


def eligible_linears(block: torch.nn.Module, config: PBS2P) -> dict[str, torch.nn.Linear]:
    """The linears of ``block`` that ``config`` can convert, by name inside the block."""
    return {
        name: mod
        for name, mod in block.named_modules()
        if isinstance(mod, torch.nn.Linear) and skip_reason(mod, config) is None
    }


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
    start = time.perf_counter()
    fp_stream = config.tune_steps > 0 and config.tune_target == "fp"
    runner = SequentialRunner(model, calibration, batch_size, fp_target=config.fp_target, fp_stream=fp_stream,
                              target_damp=config.damp)
    targets = [eligible_linears(block, config) for block in runner.blocks]
    if not any(targets):
        raise ValueError(f"no linear in the decoder blocks can be converted with {config.n}:{config.m}")
    cosines = runner.block_cosines(cfs_samples) if config.cfs else None
    ns = _allocate(config, targets, cosines)

    def compress(i: int, name: str, linear: torch.nn.Linear, hessian: torch.Tensor) -> torch.Tensor:
        return compress_to_tensor(linear.weight, config, hessian, n=ns[i])

    records = runner.compress(
        targets, compress, ns=ns, cosines=cosines, progress=progress, desc="PBS²P blocks",
        true_sequential=config.true_sequential, tune_steps=config.tune_steps, tune_lr=config.tune_lr,
        tune_target=config.tune_target, tune_norms=config.tune_norms,
    )
    for record in records:
        log.info(
            "block %d: N=%d, relative output errors %s",
            record.index,
            record.n,
            {k: round(v, 4) for k, v in record.errors.items()},
        )
    report = conversion_report(model, config)
    outside = "outside the decoder blocks (kept in full precision)"
    report.skipped = [(name, outside if reason == "not converted" else reason) for name, reason in report.skipped]
    mark_hf_quantized(model, config)
    return CalibrationResult(report, records, time.perf_counter() - start, calibration.numel())


def _allocate(config: PBS2P, targets: list[dict[str, torch.nn.Linear]], cosines: list[float] | None) -> list[int]:
    """CFS coarse: per-block N from the cosine similarities, exact weighted average (or ``n`` everywhere)."""
    if cosines is None:
        return [config.n] * len(targets)
    low, high = config.n_bounds()
    sizes = [sum(lin.weight.numel() for lin in linears.values()) for linears in targets]
    present = [i for i, size in enumerate(sizes) if size]
    ns = allocate_n([cosines[i] for i in present], config.n, config.m, low, high, [sizes[i] for i in present],
                    normalize=config.cfs_normalize)
    allocation = [config.n] * len(targets)
    for i, n in zip(present, ns, strict=True):
        allocation[i] = n
    return allocation
