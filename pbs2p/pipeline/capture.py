"""The inputs of a model's decoder blocks, captured from one forward with every block replaced by a recorder.

The recorder of each block keeps the positional and keyword arguments the model passes to it besides the
hidden states (masks, rotary embeddings: Gemma-3 gives different ones to different blocks); the first
one also keeps the hidden states entering block 0. The last one ends the forward (the final norm and
the LM head never run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class _Stop(Exception):
    """Raised inside the last block to end the capture forward early (skips the norm and LM head)."""


@dataclass
class BlockCall:
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


def capture(model: torch.nn.Module, blocks: torch.nn.ModuleList, chunk: torch.Tensor
            ) -> tuple[torch.Tensor, list[BlockCall]]:
    """The hidden states entering ``blocks[0]`` and every block's other arguments, for token ids ``chunk``."""
    calls: list[BlockCall] = []
    first: list[torch.Tensor] = []
    last = len(blocks) - 1

    def recorder(i: int):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                first.append(hidden_states)
            calls.append(BlockCall(args, kwargs))
            if i == last:
                raise _Stop
            return hidden_states

        return forward

    originals = [block.__dict__.get("forward") for block in blocks]  # instance-level forwards, if any
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        with torch.no_grad():
            model(chunk, use_cache=False)
    except _Stop:
        pass
    finally:
        for block, forward in zip(blocks, originals, strict=True):
            if forward is None:
                del block.forward  # back to the class's forward: nothing left on the instance
            else:
                block.forward = forward
    if len(calls) != len(blocks):
        raise RuntimeError(f"captured {len(calls)} block calls for {len(blocks)} blocks")
    return first[0], calls


class StopAt:
    """Forward pre-hooks on ``linears`` that record their inputs, ending the forward once ``stop_at`` is reached."""

    def __init__(self, linears: dict[str, torch.nn.Module], stop_at: str | None) -> None:
        self.linears, self.stop_at = linears, stop_at
        self.seen: list[tuple[str, torch.Tensor]] = []

    def run(self, block: torch.nn.Module, x: torch.Tensor, call: BlockCall) -> list[tuple[str, torch.Tensor]]:
        def hook(name: str, args: tuple) -> None:
            if all(n != name for n, _ in self.seen):
                self.seen.append((name, args[0]))
            if name == self.stop_at:
                raise _Stop

        handles = [lin.register_forward_pre_hook(lambda _m, a, name=name: hook(name, a))
                   for name, lin in self.linears.items()]
        try:
            block(x, *call.args, **call.kwargs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return self.seen
