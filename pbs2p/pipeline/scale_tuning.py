"""Scale tuning (beyond the paper): a block's ``α, μ`` refit by gradient on the block's output.

Each linear's ``α, μ`` are already the least-squares optimum of *its own* output error. The block's
output also depends on how the errors of its linears interact through attention and the gated MLP,
which no per-linear fit sees. Here masks and signs stay fixed (the packed codes and the storage do not
change) and only the scales move: ``α = α₀·exp(s)``, ``μ = μ₀ + α₀·t`` with ``s, t`` started at 0 and
trained with Adam to minimise the mean squared error between the block's output and the uncompressed
block's output on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..algorithms import BinarizedWeight
from ..kernels.packing import FORMAT_VERSION, expand_scales
from ..tensor import BinarySparseTensor


@dataclass(frozen=True)
class ScaleTuning:
    """Passes of Adam over the calibration batches on every block's ``α, μ`` (masks and signs fixed).

    Args:
        steps: passes over the calibration batches per block.
        lr: Adam's learning rate (on ``log α`` and on ``μ/α``).

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
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"ScaleTuning.lr must be a number > 0, got {self.lr!r}")


class _ScaledBinary:
    """Differentiable ``Ŵ(s, t)`` of one packed linear, swapped into its ``forward``."""

    def __init__(self, linear: torch.nn.Linear, parts: BinarizedWeight) -> None:
        weight: BinarySparseTensor = linear.weight
        self.linear, self.weight = linear, weight
        cols = parts.mask.shape[1]
        self.alpha0 = expand_scales(weight.scale.float(), weight.scale_block, cols)
        self.mu0 = expand_scales(weight.zero_point.float(), weight.scale_block, cols)
        self.keep = parts.mask.float()
        self.sign = torch.where(parts.signs, 1.0, -1.0) * self.keep
        self.s = torch.zeros(weight.scale.shape, device=weight.scale.device, requires_grad=True)
        self.t = torch.zeros(weight.scale.shape, device=weight.scale.device, requires_grad=True)
        self.own_forward = linear.__dict__.get("forward")  # an instance-level forward to restore, if any

    def dense(self) -> torch.Tensor:
        cols = self.keep.shape[1]
        s = expand_scales(self.s, self.weight.scale_block, cols)
        t = expand_scales(self.t, self.weight.scale_block, cols)
        return self.alpha0 * torch.exp(s) * self.sign + (self.mu0 + self.alpha0 * t) * self.keep

    def attach(self) -> None:
        self.linear.forward = lambda x: F.linear(x, self.dense().to(x.dtype), self.linear.bias)

    def detach(self) -> None:
        if self.own_forward is None:
            del self.linear.forward  # back to the class's forward: no instance attribute left behind
        else:
            self.linear.forward = self.own_forward

    def packed(self) -> BinarySparseTensor:
        """The tuned scales on the same packed codes (nothing is repacked)."""
        w = self.weight
        with torch.no_grad():
            alpha = w.scale.float() * torch.exp(self.s)
            mu = w.zero_point.float() + w.scale.float() * self.t
        return BinarySparseTensor(w.qdata, alpha.to(w.dtype).contiguous(), mu.to(w.dtype).contiguous(), w.n, w.m,
                                  w.scale_block, FORMAT_VERSION)


def tune_block_scales(block: torch.nn.Module, linears: dict[str, tuple[torch.nn.Linear, BinarizedWeight]],
                      inputs: list[torch.Tensor], calls, targets: list[torch.Tensor], tuning: ScaleTuning
                      ) -> dict[str, float]:
    """Tune ``α, μ`` of the packed ``linears`` (each with the method's result it was packed from), in place.

    ``inputs[b]`` and ``calls[b]`` are what the block receives for batch ``b``; ``targets[b]`` the output it
    should produce. Returns the mean training loss of the first and of the last pass.
    """
    params = [_ScaledBinary(lin, parts) for lin, parts in linears.values()]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for sb in params for p in (sb.s, sb.t)], lr=tuning.lr)
    for sb in params:
        sb.attach()
    losses: list[list[float]] = []
    try:
        with torch.enable_grad():
            for _ in range(tuning.steps):
                losses.append([])
                for x, call, y in zip(inputs, calls, targets, strict=True):
                    opt.zero_grad(set_to_none=True)
                    out = block(x, *call.args, **call.kwargs)
                    loss = F.mse_loss((out[0] if isinstance(out, tuple) else out).float(), y.float())
                    loss.backward()
                    opt.step()
                    losses[-1].append(loss.item())
    finally:
        for sb in params:
            sb.detach()
        for p in frozen:
            p.requires_grad_(True)
    for sb in params:
        sb.linear.weight = torch.nn.Parameter(sb.packed(), requires_grad=False)
    return {"first_pass": sum(losses[0]) / len(losses[0]), "last_pass": sum(losses[-1]) / len(losses[-1])}
