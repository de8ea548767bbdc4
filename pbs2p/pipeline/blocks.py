"""What :class:`~pbs2p.pipeline.SequentialRunner` walks: a model's decoder blocks and how to get each one.

A *block source* gives the runner a model whose forward captures the blocks' inputs, its decoder blocks,
and, one block at a time, that block materialised on the compute device (:meth:`open`) and put away
again (:meth:`close`). Two sources share the one compression loop:

* :class:`InMemoryBlocks`: a model already in memory. On its own device the blocks are used as they
  are (the model is changed in place; the runner restores it on failure); on another compute device
  each block is copied there while it is compressed, and its packed weights are copied back.
* :class:`~pbs2p.pipeline.checkpoint.CheckpointBlocks`: a model folder opened lazily (meta device);
  each block is read from the safetensors shards when opened, written out packed and released when
  closed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Protocol

import torch

from .families import decoder_blocks


class BlockSource(Protocol):
    """The interface :class:`~pbs2p.pipeline.SequentialRunner` uses (see the module's docstring)."""

    model: torch.nn.Module  # runs the capture forward (its blocks replaced by recorders)
    blocks: torch.nn.ModuleList  # the model's decoder blocks (possibly on the meta device)
    device: torch.device  # the compute device
    input_device: torch.device  # where the capture forward's token ids go
    restores_in_place: bool  # the blocks are the user's own: the runner keeps originals to restore them

    def capture(self) -> contextlib.AbstractContextManager: ...

    def open(self, i: int) -> torch.nn.Module: ...

    def close(self, i: int, block: torch.nn.Module, done: bool) -> None: ...

    def finish(self) -> None: ...

    def discard(self) -> None: ...


class InMemoryBlocks:
    """The decoder blocks of a model in memory, compressed on ``device`` (default: the model's device).

    ``copy``: copy each block even when ``device`` is the model's (what another device does; this makes
    that path checkable on a machine with one device).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> source = InMemoryBlocks(LlamaForCausalLM(cfg))
        >>> len(source.blocks), source.open(1) is source.blocks[1], source.device.type
        (2, True, 'cpu')
    """

    restores_in_place = True

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None, *, copy: bool = False
                 ) -> None:
        self.model, self._copy = model, copy
        self.blocks = decoder_blocks(model)
        param = next(model.parameters(), None)
        self.input_device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device) if device is not None else self.input_device
        if self.device.type == "meta" or self.input_device.type == "meta":
            raise ValueError("the model's weights are on the meta device (no values to compress); open a model "
                             "folder lazily with pbs2p.Checkpoint instead")

    @property
    def copies(self) -> bool:
        """Whether blocks are copied to another device to be compressed."""
        return self._copy or _differs(self.device, self.input_device)

    def capture(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def open(self, i: int) -> torch.nn.Module:
        return copy.deepcopy(self.blocks[i]).to(self.device) if self.copies else self.blocks[i]

    def close(self, i: int, block: torch.nn.Module, done: bool) -> None:
        pass  # the runner copies the new weights of a copied block into the model's block

    def finish(self) -> None:
        pass

    def discard(self) -> None:
        pass


def _differs(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are different places (``cuda`` and ``cuda:0`` of the current device are one)."""
    if a.type != b.type:
        return True
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) != (b.index if b.index is not None else current)
    return a.index != b.index


def move(obj, device: torch.device):
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device`` (others as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def named_state(block: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """``(full name, owning module, attribute)`` of every parameter and persistent buffer of ``block``."""
    for prefix, module in block.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name in module._parameters:
            if module._parameters[name] is not None:
                yield dot + name, module, name
        for name in module._buffers:
            if module._buffers[name] is not None and name not in module._non_persistent_buffers_set:
                yield dot + name, module, name
