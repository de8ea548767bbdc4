"""Per-linear compressors for :class:`pbs2p.pipeline.SequentialRunner` that return dense fake-quant weights.

Every baseline of ``benchmarks/quality.py`` runs through the same sequential harness as PBS²P (block by
block, each block's Hessians from the outputs of the already-compressed blocks before it): the runner
calls ``compress(block_index, name, linear, H)`` and puts the returned tensor in place of the weight.
A :class:`BitLedger` adds up what storing each layer honestly costs (every stored bit: signs, masks or
indices, salient bitmaps, group bits, scales) next to the papers' convention (weight bits only).

Example::

    ledger = BitLedger()
    compress = dense_compressor(lambda W, H: stbllm(W, H, 4, 8), ledger)
    runner.compress(targets, compress)
    ledger.bits_per_weight(), ledger.paper_bits_per_weight()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pbs2p.pipeline import Compressed
from pbs2p_lab.baselines import BaselineResult

# (W [out, in], H [in, in]) -> dense Ŵ and its honest bit count
WeightMethod = Callable[[torch.Tensor, torch.Tensor], BaselineResult]


@dataclass
class BitLedger:
    """Weight-count-weighted totals of honest and paper-convention bits over the compressed linears."""

    weights: int = 0
    honest_bits: float = 0.0
    paper_bits: float = 0.0
    per_layer: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, result: BaselineResult, numel: int) -> None:
        """Record one compressed linear of ``numel`` weights."""
        self.weights += numel
        self.honest_bits += result.bits_per_weight * numel
        self.paper_bits += result.paper_bits * numel
        info = {"bits": round(result.bits_per_weight, 4), "paper_bits": round(result.paper_bits, 4)}
        if "salient_columns" in result.details:
            info["salient_columns"] = int(result.details["salient_columns"])
        self.per_layer[name] = info

    def bits_per_weight(self) -> float:
        """Every stored bit over the number of compressed weights."""
        return self.honest_bits / max(self.weights, 1)

    def paper_bits_per_weight(self) -> float:
        """The papers' convention (weight bits only), averaged the same way."""
        return self.paper_bits / max(self.weights, 1)


def dense_compressor(method: WeightMethod, ledger: BitLedger, *, tunable: bool = True, block: int = 128
                     ) -> Callable[..., torch.Tensor | Compressed]:
    """Wrap ``method(W, H)`` as a :data:`~pbs2p.pipeline.sequential.LinearCompressor` returning dense ``Ŵ``;
    ``tunable``: as a :class:`~pbs2p.pipeline.Compressed` whose kept weights scale tuning may move (a gain
    and an offset per row and ``block`` columns, the baselines' scale block)."""

    def compress(i: int, name: str, linear: torch.nn.Linear, hessian: torch.Tensor) -> torch.Tensor | Compressed:
        weight = linear.weight.detach()
        result = method(weight.float(), hessian)
        if not bool(torch.isfinite(result.W_hat).all()):
            raise FloatingPointError(f"{result.name} produced non-finite weights in block {i} {name}")
        ledger.add(f"{i}.{name}", result, weight.numel())
        dense = result.W_hat.to(weight.dtype)
        return Compressed(dense, result.W_hat.float(), dense != 0, block) if tunable else dense

    return compress


def data_free(model_blocks: torch.nn.ModuleList, method: Callable[[torch.Tensor], BaselineResult],
              ledger: BitLedger) -> None:
    """Apply a data-free ``method(W)`` to every linear of every decoder block, in place."""
    with torch.no_grad():
        for i, block in enumerate(model_blocks):
            for name, mod in block.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    result = method(mod.weight.detach().float())
                    ledger.add(f"{i}.{name}", result, mod.weight.numel())
                    mod.weight = torch.nn.Parameter(result.W_hat.to(mod.weight.dtype), requires_grad=False)
