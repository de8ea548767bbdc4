"""Block-by-block compression of a causal LM on calibration tokens, for any per-linear compressor.

The model's forward is run once per batch with every decoder block replaced by a recorder
(:mod:`~pbs2p.pipeline.capture`). Then each block in turn is opened on the compute device (a
:mod:`block source <pbs2p.pipeline.blocks>`: the model's own block, a copy on another device, or a block
read from disk), its linears' input Hessians are collected on the inputs it receives from the
already-compressed blocks before it, its linears are compressed, it is run again to produce the next
block's inputs, and it is closed (written out and released, for a model read from disk). Only one
block's activations and one block's weights are held at a time; the activations live where they fit
(:mod:`~pbs2p.pipeline.activations`). With a ``torch.distributed`` group the batches are split over the
ranks (:mod:`~pbs2p.pipeline.ranks`).

``true_sequential`` (GPTQ's name): inside a block, the linears are compressed in *stages* — the groups
of linears that read the same tensor, in call order (LLaMA: q/k/v, then o, then gate/up, then down) —
and each stage's Hessians are collected with the earlier stages already compressed. A stage's
statistics pass stops at its last linear, so the extra cost is a prefix of the block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..algorithms import BinarizedWeight, HessianAccumulator, relative_output_error
from ..checks import check_calibration_model
from ..kernels.packing import FORMAT_VERSION
from ..quantize import check_finite
from ..tensor import BinarySparseTensor
from .activations import PLACEMENTS, Activations, choose_placement
from .blocks import BlockSource, InMemoryBlocks, move
from .capture import BlockCall, StopAt, capture, check_calibration
from .checkpoint import Checkpoint, CheckpointBlocks
from .families import is_conv1d, linears_as_nn_linear
from .host_memory import release_free_memory
from .ranks import Ranks
from .scale_tuning import ScaleTuning, tune_block_scales

_BlockCall = BlockCall  # the older private name

__all__ = ["BlockRecord", "Compressed", "LinearCompressor", "SequentialRunner", "check_calibration"]


@dataclass
class Compressed:
    """What a compressor made of one linear: the ``weight`` to store (packed or dense), the float32
    ``dense`` weight it represents and, for scale tuning, the ``keep`` mask of its nonzero weights and the
    ``block`` of columns that share a gain and an offset (its scale block).

    Made :meth:`from_parts`, it also keeps the method's ``parts`` (masks, signs, scales), from which
    :meth:`expanded` recomputes ``dense`` after :meth:`compact` dropped it (4 bytes a weight) between
    the time its error is measured and the time its scales are tuned.
    """

    weight: torch.Tensor
    dense: torch.Tensor | None
    keep: torch.Tensor
    block: int
    parts: BinarizedWeight | None = None

    @classmethod
    def from_parts(cls, weight: BinarySparseTensor, parts: BinarizedWeight) -> Compressed:
        return cls(weight, parts.dequantize(), parts.mask, parts.scale_block, parts)

    def compact(self) -> None:
        """Drop ``dense`` if it can be recomputed from ``parts``."""
        if self.parts is not None:
            self.dense = None

    def expanded(self) -> Compressed:
        """This, with ``dense`` recomputed if :meth:`compact` dropped it (the same values)."""
        if self.dense is None:
            self.dense = self.parts.dequantize()
        return self


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


def open_source(model: torch.nn.Module | Checkpoint | BlockSource, device, writer: bool = True) -> BlockSource:
    """The block source of ``model``: in memory, a :class:`Checkpoint` read from disk, or a source as it is."""
    if isinstance(model, Checkpoint):
        return CheckpointBlocks(model, device, writer)
    if isinstance(model, torch.nn.Module):
        return InMemoryBlocks(model, device)
    if all(hasattr(model, a) for a in ("blocks", "open", "close", "capture")):
        return model
    raise TypeError(f"expected a transformers model or a pbs2p.Checkpoint, got {type(model).__name__}")


class SequentialRunner:
    """Holds the calibration activations of one block at a time and walks the decoder blocks.

    Args:
        model: a transformers causal LM in memory, or a :class:`~pbs2p.Checkpoint` (read block by block).
        calibration: ``LongTensor [nsamples, seqlen]`` of token ids.
        batch_size: samples per forward call.
        device: the compute device (default: the model's; a checkpoint's: the CPU).
        group: a ``torch.distributed`` process group whose ranks split the batches (``None``: this process).
        activations: ``"device"``, ``"cpu"`` or ``"disk"`` (see :mod:`~pbs2p.pipeline.activations`), or
            ``"auto"``: on the device if they fit.

    Construction refuses bad calibration data and NaN/Inf weights before changing anything, then
    turns GPT-2's ``Conv1D`` into equivalent ``nn.Linear`` and captures the blocks' inputs. Every change
    it makes to the model is recorded, and :meth:`restore` undoes them all (a failed run changes nothing).
    """

    def __init__(self, model: torch.nn.Module | Checkpoint, calibration: torch.Tensor, batch_size: int = 4, *,
                 device: torch.device | str | None = None, group=None, activations: str = "auto") -> None:
        check_calibration(calibration)
        if isinstance(model, torch.nn.Module):  # a checkpoint folder's model is a meta skeleton by design
            check_calibration_model(model, calibration)
        if activations not in (*PLACEMENTS, "auto"):
            raise ValueError(f"activations must be one of {PLACEMENTS} or 'auto', got {activations!r}")
        writer = group is None or _rank(group) == 0
        self.source = open_source(model, device, writer)
        self.model, self.blocks, self.device = self.source.model, self.source.blocks, self.source.device
        self._replaced: list = []
        self._originals: dict[torch.nn.Linear, torch.nn.Parameter] = {}
        self._new: set[torch.nn.Module] = set()  # linears of open blocks given a new weight
        self._open: dict[int, torch.nn.Module] = {}
        self._stage_cache: dict[tuple, list[list[str]]] = {}
        self.hidden: Activations | None = None
        try:
            for i, block in enumerate(self.blocks):
                for name, mod in block.named_modules():
                    weight = getattr(mod, "weight", None)
                    if (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)) and weight.dtype.is_floating_point \
                            and weight.device.type != "meta":
                        check_finite(f"block {i}: {name}", weight)
            self._replaced = [r for block in self.blocks for r in linears_as_nn_linear(block)]
            chunks = calibration.to(self.source.input_device).split(batch_size)
            self.batch_sizes = [chunk.shape[0] for chunk in chunks]
            self.ranks = Ranks(len(chunks), group, self.device)
            self.calls: list[list[BlockCall]] = [[] for _ in self.blocks]
            with self.source.capture():
                for b in self.ranks.batches:
                    first, calls = capture(self.model, self.blocks, chunks[b])
                    if self.hidden is None:
                        placement = activations if activations != "auto" else choose_placement(
                            first.numel() * first.element_size(), len(self.ranks.batches), self.device)
                        self.hidden = Activations(self.device, placement)
                    self.hidden.append(first)
                    for i, call in enumerate(calls):
                        self.calls[i].append(BlockCall(move(call.args, self.device), move(call.kwargs, self.device)))
        except BaseException:
            self.restore()
            raise

    # ------------------------------------------------------------------ blocks
    def block(self, i: int) -> torch.nn.Module:
        """Block ``i`` as it is computed: open on the compute device, or the model's own block."""
        return self._open.get(i, self.blocks[i])

    def open(self, i: int) -> torch.nn.Module:
        """Materialise block ``i`` on the compute device (see :meth:`BlockSource.open`)."""
        if i not in self._open:
            self._open[i] = self.source.open(i)
        return self._open[i]

    def close(self, i: int, done: bool) -> None:
        """Put block ``i`` away; ``done``: it was compressed (its new weights are kept or written)."""
        work = self._open.pop(i, None)
        if work is None:
            return
        own = work is self.blocks[i]
        if done and not own:  # a copy on the compute device: its new weights go into the model's block
            home = self.source.input_device
            for name, mod in work.named_modules():
                if mod in self._new:
                    self.set_weight(self.blocks[i].get_submodule(name), mod.weight.detach().to(home))
        self._new.difference_update(self.blocks[i].modules())
        for mod in work.modules():
            self._new.discard(mod)
            if not own or not self.source.restores_in_place:
                self._originals.pop(mod, None)
        self.source.close(i, work, done)
        release_free_memory()

    def finish(self) -> None:
        """After a successful run: let the source write what remains; free the offloaded activations."""
        self.source.finish()
        self.ranks.barrier()
        self._free_activations()

    @torch.no_grad()
    def run_block(self, i: int, hidden: Iterable[torch.Tensor]) -> Activations:
        """Outputs of block ``i`` for the given input batches (this rank's, in order)."""
        outputs = self._store()
        block = self.block(i)
        for x, call in zip(hidden, self.calls[i], strict=False):
            out = block(x, *call.args, **call.kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    def _store(self) -> Activations:
        return self.hidden.like()

    def _set_hidden(self, hidden: Activations) -> None:
        if hidden is not self.hidden:
            self.hidden.release()
        self.hidden = hidden

    def _free_activations(self) -> None:
        if self.hidden is not None:
            self.hidden.release()
            if self.hidden.folder is not None:
                self.hidden.folder.cleanup()

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def block_cosines(self, samples: int) -> list[float]:
        """Cosine similarity of each block's input and output, uncompressed, on about ``samples`` samples
        (the first batches, in order, until they hold ``samples``)."""
        chosen, taken = [], 0
        for b, size in enumerate(self.batch_sizes):
            if taken >= samples:
                break
            chosen.append(b)
            taken += size
        x = self._store()
        for b in chosen:
            if self.ranks.mine(b):
                x.append(self.hidden[self.ranks.local(b)])
        cosines = []
        for i in range(len(self.blocks)):
            if len(x):
                self.open(i)
            y = self.run_block(i, x)
            self.close(i, done=False)
            sims = {b: float(torch.nn.functional.cosine_similarity(a.float(), c.float(), dim=-1).mean())
                    for b, a, c in zip([b for b in chosen if self.ranks.mine(b)], x, y, strict=True)}
            values = self.ranks.gather(sims)
            cosines.append(float(torch.tensor(values, dtype=torch.float32, device=self.device).mean()))
            x.release()
            x = y
        x.release()
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

    def _inputs(self, i: int, x: torch.Tensor, call: BlockCall, linears: dict[str, torch.nn.Linear],
                stop_at: str | None, ordered: bool = False):
        """Run block ``i`` on ``x`` and return the inputs of ``linears`` (by name, or in call order with
        ``ordered``), stopping once ``stop_at`` is reached."""
        seen = StopAt(linears, stop_at).run(self.block(i), x, call)
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
        With several ranks, each accumulates its batches and the sums are all-reduced.
        """
        owner: dict[str, str] = {}
        acc: dict[str, HessianAccumulator] = {}
        for x, call in zip(self.hidden, self.calls[i], strict=True):
            seen = self._inputs(i, x, call, linears, stop_at)
            if not owner:  # first batch: group the linears by the identity of their input tensor
                for name, tensor in seen.items():
                    owner[name] = next((o for o in owner.values() if seen[o] is tensor), name)
            for name in {owner[name] for name in seen}:
                acc.setdefault(name, HessianAccumulator(linears[name].in_features, x.device, _sum_dtype(x.device))
                               ).add(seen[name])
        missing = sorted(set(linears) - set(owner))
        if missing:
            raise RuntimeError(f"linears {missing} were not called in their block's forward")
        if self.ranks.distributed:
            for name in sorted(acc):
                acc[name].all_reduce(self.ranks.group)
        return {name: acc[owner[name]].hessian() for name in linears}

    # ------------------------------------------------------------------ weights
    def set_weight(self, linear: torch.nn.Linear, weight: torch.Tensor) -> None:
        """Replace ``linear``'s weight, remembering the original for :meth:`restore`."""
        self._originals.setdefault(linear, linear.weight)
        self._new.add(linear)
        linear.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)

    def restore(self) -> None:
        """Put back every original weight and module this runner replaced; discard what was written."""
        for linear, weight in self._originals.items():
            linear.weight = weight
        for parent, name, module in reversed(self._replaced):
            setattr(parent, name, module)
        self._originals.clear()
        self._new.clear()
        self._replaced.clear()
        self._open.clear()
        self.source.discard()
        self._free_activations()

    def _share(self, stage: list[str], results: dict) -> dict:
        """Every rank's compressed linears of ``stage`` on every rank (linear ``j`` from rank ``j % world``)."""
        if not self.ranks.distributed:
            return results
        shared = {}
        for j, name in enumerate(stage):
            src, mine = self.ranks.owner(j), self.ranks.mine(j)
            result = results.get(name)
            info, tensors = _flatten(result) if mine else (None, None)
            tensors, info = self.ranks.broadcast(tensors, src, self.device, info)
            shared[name] = result if mine else _unflatten(info, tensors)
        return shared

    # ------------------------------------------------------------------ the loop
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

        ``targets[i]`` names the linears of block ``i`` (its values are the model's modules; the linears
        computed are those of the block as opened). Recorded errors are ``‖(W − Ŵ)X̂‖/‖WX̂‖`` on the
        calibration inputs. With ``tuning`` the packed linears' scales are then tuned on the block's
        output, towards the uncompressed block's output on the same inputs
        (:mod:`~pbs2p.pipeline.scale_tuning`); the losses land in ``BlockRecord.tune``.
        """
        records = []
        bar = tqdm(range(len(self.blocks)), desc=desc, disable=not progress or self.ranks.rank != 0)
        for i in bar:
            t0 = time.perf_counter()
            block = self.open(i)
            linears = {name: block.get_submodule(name) for name in targets[i]}
            originals = {name: lin.weight for name, lin in linears.items()}
            # what a block of this source keeps of its original weights only until each is compressed
            transient = block is not self.blocks[i] or not self.source.restores_in_place
            target = self.run_block(i, self.hidden) if tuning is not None and linears else None  # uncompressed
            errors, parts = {}, {}
            order = self.stages(i, linears) if linears else []
            for stage in (order if true_sequential else [[name for group in order for name in group]]) if order else []:
                hessians = self.hessians(i, {name: linears[name] for name in stage}, stop_at=stage[-1])
                results = {name: compress(i, name, linears[name], hessians[name])
                           for j, name in enumerate(stage) if self.ranks.mine(j)}
                results = self._share(stage, results)
                for name in stage:
                    lin, H, result = linears[name], hessians.pop(name), results.pop(name)
                    if isinstance(result, Compressed):
                        parts[name] = result
                    else:
                        result = Compressed(result, result.float(), result != 0, result.shape[1])
                    errors[name] = relative_output_error(originals[name].detach().float(), result.dense, H)
                    self.set_weight(lin, result.weight)
                    result.compact()
                    if transient:
                        del originals[name]
                        self._originals.pop(lin, None)
                del hessians, results
                release_free_memory()
            tune = None
            if target is not None and parts:  # compressors that return a Compressed are tuned
                tuned = {n: (linears[n], p) for n, p in parts.items()}
                tune, outputs = tune_block_scales(self, i, tuned, target, tuning)
                self._set_hidden(outputs)
            else:
                self._set_hidden(self.run_block(i, self.hidden))
            if target is not None:
                target.release()
            del originals, parts, linears, block, target
            self.close(i, done=True)
            records.append(BlockRecord(i, None if ns is None else ns[i], None if cosines is None else cosines[i],
                                       errors, time.perf_counter() - t0, tune))
            bar.set_postfix(worst_err=f"{max(errors.values(), default=0.0):.3f}")
        return records


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 Hessian sums, float32 where the device has no float64 (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_initialized() else 0


def _flatten(result) -> tuple[tuple, list[torch.Tensor]]:
    """A compressor's result as (picklable layout, tensors) for a broadcast."""
    if not isinstance(result, Compressed):
        return ("dense",), [result.detach()]
    w = result.weight
    if isinstance(w, BinarySparseTensor) and result.parts is not None:
        p = result.parts
        layout = ("packed", w.n, w.m, w.scale_block, p.scale_block)
        return layout, [w.qdata, w.scale, w.zero_point, p.mask, p.signs, p.alpha, p.mu]
    result.expanded()
    return ("compressed", result.block), [w.detach(), result.dense, result.keep]


def _unflatten(layout: tuple, tensors: list[torch.Tensor]):
    if layout[0] == "dense":
        return tensors[0]
    if layout[0] == "compressed":
        return Compressed(tensors[0], tensors[1], tensors[2], layout[1])
    _, n, m, scale_block, parts_block = layout
    qdata, scale, zero_point, mask, signs, alpha, mu = tensors
    weight = BinarySparseTensor(qdata, scale, zero_point, n, m, scale_block, FORMAT_VERSION)
    return Compressed.from_parts(weight, BinarizedWeight(mask, signs, alpha, mu, parts_block))
