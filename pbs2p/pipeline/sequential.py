"""Block-by-block compression of a causal LM on calibration tokens, for any per-linear compressor.

The model's forward is run once per batch with every decoder block replaced by a recorder, which keeps
the hidden states entering block 0 and the other arguments each block receives (masks, rotary
embeddings: Gemma-3 gives different ones to different blocks). Then each block in turn: its linears'
input Hessians are collected on the inputs it receives from the already-compressed blocks before it,
its linears are compressed, and it is run again to produce the next block's inputs. Only one block's
activations are held at a time.

``true_sequential`` (GPTQ's name): inside a block, the linears are compressed in *stages* — the groups
of linears that read the same tensor, in call order (LLaMA: q/k/v, then o, then gate/up, then down) —
and each stage's Hessians are collected with the earlier stages already compressed. A stage's
statistics pass stops at its last linear, so the extra cost is a prefix of the block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..algorithms import BinarizedWeight, HessianAccumulator, relative_output_error
from ..checks import check_calibration_model
from ..quantize import check_finite
from ..tensor import BinarySparseTensor
from .families import decoder_blocks, is_conv1d, linears_as_nn_linear
from .scale_tuning import ScaleTuning, tune_block_scales


@dataclass
class Compressed:
    """What a compressor made of one linear: the ``weight`` to store (packed or dense), the float32
    ``dense`` weight it represents and, for scale tuning, the ``keep`` mask of its nonzero weights and the
    ``block`` of columns that share a gain and an offset (its scale block)."""

    weight: torch.Tensor
    dense: torch.Tensor
    keep: torch.Tensor
    block: int

    @classmethod
    def from_parts(cls, weight: BinarySparseTensor, parts: BinarizedWeight) -> Compressed:
        return cls(weight, parts.dequantize(), parts.mask, parts.scale_block)


# (block index, linear name inside the block, the linear, its input Hessian) -> the new weight: a plain
# tensor (not tuned), or a Compressed
LinearCompressor = Callable[[int, str, torch.nn.Linear, torch.Tensor], "torch.Tensor | Compressed"]


@dataclass
class BlockRecord:
    """What happened to one decoder block."""

    index: int
    n: int | None  # N kept per group (PBS²P), if the compressor has one
    cosine: float | None  # cosine similarity of the block's input and output (CFS), if measured
    errors: dict[str, float]  # linear name -> ||(W - W_hat) X|| / ||W X|| on the calibration inputs
    seconds: float
    tune: dict[str, float] | None = None  # block output MSE before/after scale tuning, if tuned


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
    turns GPT-2's ``Conv1D`` into equivalent ``nn.Linear`` and captures the blocks' inputs. Every change
    it makes to the model is recorded, and :meth:`restore` undoes them all (a failed run changes nothing).
    """

    def __init__(self, model: torch.nn.Module, calibration: torch.Tensor, batch_size: int = 4) -> None:
        check_calibration(calibration)
        check_calibration_model(model, calibration)
        self.blocks = decoder_blocks(model)
        for i, block in enumerate(self.blocks):
            for name, mod in block.named_modules():
                weight = getattr(mod, "weight", None)
                if (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)) and weight.dtype.is_floating_point:
                    check_finite(f"block {i}: {name}", weight)
        self._replaced = [r for block in self.blocks for r in linears_as_nn_linear(block)]
        self._originals: dict[torch.nn.Linear, torch.nn.Parameter] = {}
        device = next(model.parameters()).device
        captured = [self._capture(model, chunk) for chunk in calibration.to(device).split(batch_size)]
        self.hidden = [h for h, _ in captured]
        self.calls = [[calls[i] for _, calls in captured] for i in range(len(self.blocks))]
        self._stage_cache: dict[tuple, list[list[str]]] = {}

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

        originals = [block.__dict__.get("forward") for block in self.blocks]  # instance-level forwards, if any
        try:
            for i, block in enumerate(self.blocks):
                block.forward = recorder(i)
            with torch.no_grad():
                model(chunk, use_cache=False)
        except _Stop:
            pass
        finally:
            for block, forward in zip(self.blocks, originals, strict=True):
                if forward is None:
                    del block.forward  # back to the class's forward: nothing left on the instance
                else:
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
    def stages(self, i: int, linears: dict[str, torch.nn.Linear]) -> list[list[str]]:
        """The linears of block ``i`` grouped by the tensor they read, groups in call order.

        LLaMA: ``[[q, k, v], [o], [gate, up], [down]]``. Found from one forward of the first batch,
        cached for blocks of the same type and linear names.
        """
        key = (type(self.blocks[i]).__name__, tuple(sorted(linears)))
        if key not in self._stage_cache:
            seen = self._inputs(i, self.hidden[0], self.calls[i][0], linears, None, ordered=True)
            groups: list[list[str]] = []
            for name, tensor in seen:
                hit = next((g for g in groups if dict(seen)[g[0]] is tensor), None)
                if hit is None:
                    groups.append([name])
                elif name not in hit:
                    hit.append(name)
            self._stage_cache[key] = groups
        return [list(g) for g in self._stage_cache[key]]

    def _inputs(self, i: int, x: torch.Tensor, call: _BlockCall, linears: dict[str, torch.nn.Linear],
                stop_at: str | None, ordered: bool = False):
        """Run block ``i`` on ``x`` and return the inputs of ``linears`` (by name, or in call order with
        ``ordered``), stopping once ``stop_at`` is reached."""
        seen: list[tuple[str, torch.Tensor]] = []

        def hook(name: str, args: tuple) -> None:
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))
            if name == stop_at:
                raise _Stop

        handles = [lin.register_forward_pre_hook(lambda _m, a, name=name: hook(name, a))
                   for name, lin in linears.items()]
        try:
            self.blocks[i](x, *call.args, **call.kwargs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(set(linears) - {n for n, _ in seen}) if stop_at is None else []
        if missing:
            raise RuntimeError(f"linears {missing} were not called in their block's forward")
        return seen if ordered else dict(seen)

    @torch.no_grad()
    def hessians(self, i: int, linears: dict[str, torch.nn.Linear], stop_at: str | None = None
                 ) -> dict[str, torch.Tensor]:
        """``H = 2X̂ᵀX̂/n`` of every linear's input (linears fed the same tensor share one accumulator).

        ``X̂`` are the inputs block ``i`` receives now (earlier blocks, and whatever linears of this block
        were already replaced, compressed). The block forward stops at ``stop_at`` (the last linear needed).
        """
        owner: dict[str, str] = {}
        acc: dict[str, HessianAccumulator] = {}
        for x, call in zip(self.hidden, self.calls[i], strict=True):
            seen = self._inputs(i, x, call, linears, stop_at)
            if not owner:  # first batch: group the linears by the identity of their input tensor
                for name, tensor in seen.items():
                    owner[name] = next((o for o in owner.values() if seen[o] is tensor), name)
            for name in {owner[name] for name in seen}:
                acc.setdefault(name, HessianAccumulator(linears[name].in_features, x.device)).add(seen[name])
        missing = sorted(set(linears) - set(owner))
        if missing:
            raise RuntimeError(f"linears {missing} were not called in their block's forward")
        return {name: acc[owner[name]].hessian() for name in linears}

    def _set_weights(self, i: int, weights: dict[str, torch.nn.Parameter]) -> None:
        for name, weight in weights.items():
            self.set_weight(self.blocks[i].get_submodule(name), weight)

    def set_weight(self, linear: torch.nn.Linear, weight: torch.Tensor) -> None:
        """Replace ``linear``'s weight, remembering the original for :meth:`restore`."""
        self._originals.setdefault(linear, linear.weight)
        linear.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)

    def restore(self) -> None:
        """Put back every original weight and module this runner replaced."""
        for linear, weight in self._originals.items():
            linear.weight = weight
        for parent, name, module in reversed(self._replaced):
            setattr(parent, name, module)
        self._originals.clear()
        self._replaced.clear()

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
        true_sequential: bool = False,
        tuning: ScaleTuning | None = None,
    ) -> list[BlockRecord]:
        """Compress ``targets[i]`` of every block ``i`` in order; each block sees the compressed ones before it.

        Recorded errors are ``‖(W − Ŵ)X̂‖/‖WX̂‖`` on the calibration inputs. With ``tuning`` the packed
        linears' scales are then tuned on the block's output, towards the uncompressed block's output on
        the same inputs (:mod:`~pbs2p.pipeline.scale_tuning`); the losses land in ``BlockRecord.tune``.
        """
        records = []
        bar = tqdm(range(len(self.blocks)), desc=desc, disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            linears = targets[i]
            originals = {name: lin.weight for name, lin in linears.items()}
            errors, parts = {}, {}
            order = self.stages(i, linears) if linears else []
            for stage in (order if true_sequential else [[name for group in order for name in group]]) if order else []:
                hessians = self.hessians(i, {name: linears[name] for name in stage}, stop_at=stage[-1])
                for name in stage:
                    lin, H = linears[name], hessians.pop(name)
                    result = compress(i, name, lin, H)
                    if isinstance(result, Compressed):
                        parts[name] = result
                    else:
                        result = Compressed(result, result.float(), result != 0, result.shape[1])
                    errors[name] = relative_output_error(originals[name].detach().float(), result.dense, H)
                    self.set_weight(lin, result.weight)
            tune = None
            if tuning is not None and parts:  # compressors that return a Compressed are tuned
                current = {name: lin.weight for name, lin in linears.items()}
                self._set_weights(i, originals)
                target = self.run_block(i, self.hidden)
                self._set_weights(i, current)
                tuned = {n: (linears[n], p) for n, p in parts.items()}
                tune, outputs = tune_block_scales(self, i, tuned, target, tuning)
                self.hidden = outputs
            else:
                self.hidden = self.run_block(i, self.hidden)
            records.append(BlockRecord(i, None if ns is None else ns[i], None if cosines is None else cosines[i],
                                       errors, time.perf_counter() - t0, tune))
            bar.set_postfix(worst_err=f"{max(errors.values(), default=0.0):.3f}")
        return records

