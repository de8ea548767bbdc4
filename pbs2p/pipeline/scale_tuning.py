"""Scale tuning (beyond the paper): a block's ``α, μ`` refit by gradient on the block's output.

Each linear's ``α, μ`` are already the least-squares optimum of *its own* output error. The block's
output also depends on how the errors of its linears interact through attention and the gated MLP,
which no per-linear fit sees. Here masks and signs stay fixed (the packed codes and the storage do not
change) and only the scales move: ``α = α₀·exp(s)``, ``μ = μ₀·exp(s) + t·c`` (``c``: the mean magnitude of
the kept weights there) with ``s, t`` started at 0 and trained with Adam to minimise the mean squared
error between the block's output and the uncompressed block's output on the same inputs. The tuned
scales are kept only if they are finite and the block's error went down; otherwise the block keeps its
untuned scales and a warning names the block (and the linear whose scales went bad).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.packing import FORMAT_VERSION, expand_scales
from ..tensor import BinarySparseTensor

log = logging.getLogger("pbs2p")
MAX_LR = 0.1


@dataclass(frozen=True)
class ScaleTuning:
    """Passes of Adam over the calibration batches on every block's ``α, μ`` (masks and signs fixed).

    Args:
        steps: passes over the calibration batches per block.
        lr: Adam's learning rate (on ``log α`` and on ``μ/α``), at most 0.1.

    Example:
        >>> from pbs2p import ScaleTuning
        >>> ScaleTuning(steps=5).lr
        0.01
        >>> ScaleTuning(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: ScaleTuning.steps must be an int >= 1 (pass tuning=None for none), got 0
    """

    steps: int = 3
    lr: float = 1e-2

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"ScaleTuning.steps must be an int >= 1 (pass tuning=None for none), got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0 < self.lr <= MAX_LR:
            raise ValueError(f"ScaleTuning.lr must be a number in (0, {MAX_LR}], got {self.lr!r}")


class _Tunable:
    """``Ŵ(s, t) = keep ⊙ (Ŵ₀·exp(s) + t·c)`` of one linear: a gain and an offset of its kept weights per row
    and ``block`` columns (``c``: their mean magnitude there), swapped into the linear's ``forward``.

    For a packed weight (``block`` = its ``scale_block``) this is ``α' = α·exp(s)``, ``μ' = μ·exp(s) + t·c``
    on the same codes; any binarized weight's stored levels absorb it the same way.
    """

    def __init__(self, linear: torch.nn.Linear, compressed) -> None:
        self.linear, self.weight, self.block = linear, linear.weight, compressed.block
        self.keep = compressed.keep.float()
        self.w0 = compressed.dense.float() * self.keep
        out, cols = self.keep.shape
        nb = math.ceil(cols / self.block)
        pad = nb * self.block - cols
        sums = F.pad(self.w0.abs(), (0, pad)).reshape(out, nb, -1).sum(-1)
        counts = F.pad(self.keep, (0, pad)).reshape(out, nb, -1).sum(-1).clamp_min(1.0)
        self.c = sums / counts
        self.s = torch.zeros(out, nb, device=self.w0.device, requires_grad=True)
        self.t = torch.zeros(out, nb, device=self.w0.device, requires_grad=True)
        self.own_forward = linear.__dict__.get("forward")  # an instance-level forward to restore, if any

    def dense(self) -> torch.Tensor:
        cols = self.keep.shape[1]
        gain = expand_scales(torch.exp(self.s), self.block, cols)
        offset = expand_scales(self.t * self.c, self.block, cols)
        return (self.w0 * gain + offset) * self.keep

    def attach(self) -> None:
        self.linear.forward = lambda x: F.linear(x, self.dense().to(x.dtype), self.linear.bias)

    def detach(self) -> None:
        if self.own_forward is None:
            del self.linear.forward  # back to the class's forward: no instance attribute left behind
        else:
            self.linear.forward = self.own_forward

    def result(self) -> torch.Tensor:
        """The tuned weight: new scales on the same packed codes (nothing is repacked), or the dense weight."""
        w = self.weight
        with torch.no_grad():
            if not isinstance(w, BinarySparseTensor):
                return self.dense().to(w.dtype)
            gain = torch.exp(self.s)
            alpha, mu = w.scale.float() * gain, w.zero_point.float() * gain + self.t * self.c
        return BinarySparseTensor(w.qdata, alpha.to(w.dtype).contiguous(), mu.to(w.dtype).contiguous(), w.n, w.m,
                                  w.scale_block, FORMAT_VERSION)


def tune_block_scales(runner, i: int, linears: dict[str, tuple], targets, tuning: ScaleTuning) -> tuple[dict, object]:
    """Tune the scales of ``linears`` of block ``i`` of ``runner`` (a ``SequentialRunner``).

    ``linears`` maps names to ``(linear, Compressed)`` (what the linear holds and represents); ``targets[b]`` is the
    output block ``i`` should give for this rank's batch ``b``. Returns what happened (block errors before and
    after, first and last pass losses, whether the tuned scales were kept) and the block's outputs with the
    scales it keeps. Adam steps on the batches in order; with several ranks, the rank of each batch computes
    its step's loss and gradients and broadcasts them, so every rank takes the steps one process would.
    """
    block, inputs, calls, ranks = runner.block(i), runner.hidden, runner.calls[i], runner.ranks
    untuned = runner.run_block(i, inputs)
    before = _mse(runner, untuned, targets)
    params = {}
    for name, (lin, compressed) in linears.items():
        params[name] = _Tunable(lin, compressed.expanded())
        compressed.compact()
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    tensors = [p for sb in params.values() for p in (sb.s, sb.t)]
    opt = torch.optim.Adam(tensors, lr=tuning.lr)
    for sb in params.values():
        sb.attach()
    losses: list[list[float]] = []
    problem = None
    try:
        with torch.enable_grad():
            for _ in range(tuning.steps):
                losses.append([])
                for b in range(ranks.total):
                    opt.zero_grad(set_to_none=True)
                    loss = _step_loss(block, ranks, b, inputs, calls, targets)
                    loss = _shared_step(ranks, b, loss, tensors, runner.device)
                    if not math.isfinite(loss):
                        problem = f"the tuning loss became {loss}"
                        break
                    opt.step()
                    losses[-1].append(loss)
                if problem:
                    break
    finally:
        for sb in params.values():
            sb.detach()
        for p in frozen:
            p.requires_grad_(True)
    record = {"before": before, "first_pass": _mean(losses[0]), "last_pass": _mean(losses[-1]), "kept": False}
    if problem is None:
        packed = {name: sb.result() for name, sb in params.items()}
        bad = [name for name, w in packed.items() if not _finite(w)]
        if bad:
            problem = f"the tuned scales of {bad} are not finite"
        else:
            untuned_weights = {name: lin.weight for name, (lin, _) in linears.items()}
            for name, (lin, _) in linears.items():
                runner.set_weight(lin, packed[name])
            outputs = runner.run_block(i, inputs)
            record["after"] = _mse(runner, outputs, targets)
            if record["after"] < before:
                record["kept"] = True
                untuned.release()
                return record, outputs
            outputs.release()
            problem = f"the block error did not go down ({before:.4g} -> {record['after']:.4g})"
            for name, (lin, _) in linears.items():
                lin.weight = untuned_weights[name]
    log.warning("scale tuning of block %d refused: %s; the block keeps its untuned scales", i, problem)
    record["refused"] = problem
    return record, untuned


def _step_loss(block, ranks, b: int, inputs, calls, targets) -> float | None:
    """The loss of batch ``b`` (its gradients accumulated) on the rank that holds it; ``None`` elsewhere."""
    if not ranks.mine(b):
        return None
    k = ranks.local(b)
    call = calls[k]
    out = block(inputs[k], *call.args, **call.kwargs)
    loss = F.mse_loss((out[0] if isinstance(out, tuple) else out).float(), targets[k].float())
    value = loss.item()
    if math.isfinite(value):
        loss.backward()
    return value


def _shared_step(ranks, b: int, loss: float | None, tensors: list[torch.Tensor], device) -> float:
    """The loss of batch ``b`` and, on every rank, its gradients (broadcast from the rank that computed them)."""
    if not ranks.distributed:
        return loss
    src = ranks.owner(b)
    mine = ranks.mine(b)
    grads, value = ranks.broadcast([p.grad for p in tensors] if mine else None, src, device, loss)
    if not mine:
        for p, g in zip(tensors, grads, strict=True):
            p.grad = g
    return value


def _finite(w: torch.Tensor) -> bool:
    parts = (w.scale, w.zero_point) if isinstance(w, BinarySparseTensor) else (w,)
    return all(bool(torch.isfinite(t).all()) for t in parts)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _mse(runner, outputs, targets) -> float:
    """Mean squared difference of a block's outputs and their targets over all batches (of every rank)."""
    sums = {b: float(F.mse_loss(o.float(), y.float(), reduction="sum"))
            for b, o, y in zip(runner.ranks.batches, outputs, targets, strict=True)}
    total = sum(runner.ranks.gather(sums))
    return total / max(runner.ranks.total_count(sum(y.numel() for y in targets)), 1)
