"""Block-by-block compression of a causal LM on calibration tokens, for any per-linear compressor.

The model's forward is run once per batch with every decoder block replaced by a recorder, which keeps
the hidden states entering block 0 and the other arguments each block receives (masks, rotary
embeddings: Gemma-3 gives different ones to different blocks). Then each block in turn: its linears'
input Hessians are collected on the inputs it receives from the already-compressed blocks before it,
its linears are compressed, and it is run again to produce the next block's inputs. Only one block's
activations are held at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..algorithms import HessianAccumulator, relative_output_error
from ..quantize import check_finite
from .families import decoder_blocks, is_conv1d, linears_as_nn_linear

# (block index, linear name inside the block, the linear, its input Hessian) -> the new weight
LinearCompressor = Callable[[int, str, torch.nn.Linear, torch.Tensor], torch.Tensor]


@dataclass
class BlockRecord:
    """What happened to one decoder block."""

    index: int
    n: int | None  # N kept per group (PBS²P), if the compressor has one
    cosine: float | None  # cosine similarity of the block's input and output (CFS), if measured
    errors: dict[str, float]  # linear name -> ||(W - W_hat) X|| / ||W X|| on the calibration inputs
    seconds: float


class _Stop(Exception):
    """Raised inside the last block to end the capture forward early (skips the norm and LM head)."""


@dataclass
class _BlockCall:
    """The positional and keyword arguments the model passes to a block besides the hidden states."""

    args: tuple
    kwargs: dict


def check_calibration(calibration: object) -> None:
    """Refuse anything but a non-empty integer ``[nsamples, seqlen]`` tensor of token ids."""
    if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and calibration.numel() > 0):
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a non-empty LongTensor [nsamples, seqlen], got {shape}")
    if calibration.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calibration must hold token ids (int64), got {calibration.dtype}")


class SequentialRunner:
    """Holds the calibration activations of one block at a time and walks the decoder blocks.

    Construction refuses bad calibration data and NaN/Inf weights before changing anything, then
    turns GPT-2's ``Conv1D`` into equivalent ``nn.Linear`` and captures the blocks' inputs.
    """

    def __init__(self, model: torch.nn.Module, calibration: torch.Tensor, batch_size: int = 4) -> None:
        check_calibration(calibration)
        self.blocks = decoder_blocks(model)
        for i, block in enumerate(self.blocks):
            for name, mod in block.named_modules():
                weight = getattr(mod, "weight", None)
                if (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)) and weight.dtype.is_floating_point:
                    check_finite(f"block {i}: {name}", weight)
        for block in self.blocks:
            linears_as_nn_linear(block)
        device = next(model.parameters()).device
        captured = [self._capture(model, chunk) for chunk in calibration.to(device).split(batch_size)]
        self.hidden = [h for h, _ in captured]
        self.calls = [[calls[i] for _, calls in captured] for i in range(len(self.blocks))]

    def _capture(self, model: torch.nn.Module, chunk: torch.Tensor) -> tuple[torch.Tensor, list[_BlockCall]]:
        calls: list[_BlockCall] = []
        first: list[torch.Tensor] = []
        last = len(self.blocks) - 1

        def recorder(i: int):
            def forward(hidden_states, *args, **kwargs):
                if i == 0:
                    first.append(hidden_states)
                calls.append(_BlockCall(args, kwargs))
                if i == last:
                    raise _Stop
                return hidden_states

            return forward

        originals = [block.forward for block in self.blocks]
        try:
            for i, block in enumerate(self.blocks):
                block.forward = recorder(i)
            with torch.no_grad():
                model(chunk, use_cache=False)
        except _Stop:
            pass
        finally:
            for block, forward in zip(self.blocks, originals, strict=True):
                block.forward = forward
        if len(calls) != len(self.blocks):
            raise RuntimeError(f"captured {len(calls)} block calls for {len(self.blocks)} blocks")
        return first[0], calls

    @torch.no_grad()
    def run_block(self, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of block ``i`` for the given input batches."""
        outputs = []
        for x, call in zip(hidden, self.calls[i], strict=False):
            out = self.blocks[i](x, *call.args, **call.kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    @torch.no_grad()
    def block_cosines(self, samples: int) -> list[float]:
        """Cosine similarity of each block's input and output, uncompressed, on about ``samples`` samples."""
        x, taken, cosines = [], 0, []
        for h in self.hidden:
            if taken >= samples:
                break
            x.append(h)
            taken += h.shape[0]
        for i in range(len(self.blocks)):
            y = self.run_block(i, x)
            sims = [
                torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
                for a, b in zip(x, y, strict=True)
            ]
            cosines.append(float(torch.stack(sims).mean()))
            x = y
        return cosines

    @torch.no_grad()
    def hessians(self, i: int, linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
        """``H = 2XXᵀ/n`` of every linear's input; linears fed the same tensor (q/k/v, gate/up) share one."""
        seen: dict[str, torch.Tensor] = {}
        handles = [
            lin.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
            for name, lin in linears.items()
        ]
        owner: dict[str, str] = {}
        accumulators: dict[str, HessianAccumulator] = {}
        try:
            for x, call in zip(self.hidden, self.calls[i], strict=True):
                self.blocks[i](x, *call.args, **call.kwargs)
                if not owner:  # first batch: group the linears by the identity of their input tensor
                    for name, tensor in seen.items():
                        owner[name] = next((o for o in owner.values() if seen[o] is tensor), name)
                for name in {owner[name] for name in seen}:
                    acc = accumulators.setdefault(name, HessianAccumulator(linears[name].in_features, x.device))
                    acc.add(seen[name])
                seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(set(linears) - set(owner))
        if missing:
            raise RuntimeError(f"linears {missing} were not called in their block's forward")
        return {name: accumulators[owner[name]].hessian() for name in linears}

    @torch.no_grad()
    def compress(
        self,
        targets: list[dict[str, torch.nn.Linear]],
        compress: LinearCompressor,
        *,
        ns: list[int] | None = None,
        cosines: list[float] | None = None,
        progress: bool = True,
        desc: str = "blocks",
    ) -> list[BlockRecord]:
        """Compress ``targets[i]`` of every block ``i`` in order; each block sees the compressed ones before it."""
        records = []
        bar = tqdm(range(len(self.blocks)), desc=desc, disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            linears = targets[i]
            hessians = self.hessians(i, linears) if linears else {}
            errors = {}
            for name, lin in linears.items():
                H = hessians.pop(name)
                weight = compress(i, name, lin, H)
                dense = weight.dequantize(torch.float32) if hasattr(weight, "dequantize") else weight.float()
                errors[name] = relative_output_error(lin.weight.float(), dense, H)
                lin.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.hidden = self.run_block(i, self.hidden)
            record = BlockRecord(
                i,
                None if ns is None else ns[i],
                None if cosines is None else cosines[i],
                errors,
                time.perf_counter() - t0,
            )
            records.append(record)
            bar.set_postfix(worst_err=f"{max(errors.values(), default=0.0):.3f}")
        return records
