"""Block-output tuning of the binarized linears' scales: ``α, μ`` refit by gradient on a block's output.

Each linear's ``α, μ`` are already the least-squares optimum of *its own* output error. The block's
output also depends on how the errors of its linears interact through attention and the gated MLP,
which no per-linear fit sees. Here the masks and signs stay fixed (so the honest storage is unchanged)
and only the scales move: ``α = α₀·exp(s)``, ``μ = μ₀ + α₀·t`` with ``s, t`` started at 0 and trained
with Adam to minimise the mean squared error between the block's output and a target (the
full-precision model's output with ``fp_target``, else the block with its original weights on the same
inputs, or the full-precision model's hidden states).

Example::

    losses = tune_block_scales(block, {"mlp.down_proj": lin}, inputs, calls, targets, steps=8)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..algorithms.binarized import expand_blocks
from ..tensor import BinarySparseTensor


class _ScaledBinary:
    """Differentiable ``Ŵ(s, t)`` of one packed linear, swapped into its ``forward``."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        weight: BinarySparseTensor = linear.weight
        self.linear = linear
        self.weight = weight
        mask, signs = weight.unpack()
        cols = mask.shape[1]
        self.alpha0 = expand_blocks(weight.scale.float(), weight.scale_block, cols)
        self.mu0 = expand_blocks(weight.zero_point.float(), weight.scale_block, cols)
        self.keep = mask.float()
        self.sign = torch.where(signs, 1.0, -1.0) * self.keep
        nb = weight.scale.shape[1]
        self.s = torch.zeros(weight.scale.shape[0], nb, requires_grad=True)
        self.t = torch.zeros(weight.scale.shape[0], nb, requires_grad=True)
        self.own_forward = linear.__dict__.get("forward")  # an instance-level forward to restore, if any

    def dense(self) -> torch.Tensor:
        cols = self.keep.shape[1]
        s = expand_blocks(self.s, self.weight.scale_block, cols)
        t = expand_blocks(self.t, self.weight.scale_block, cols)
        return self.alpha0 * torch.exp(s) * self.sign + (self.mu0 + self.alpha0 * t) * self.keep

    def attach(self) -> None:
        self.linear.forward = lambda x: F.linear(x, self.dense().to(x.dtype), self.linear.bias)

    def detach(self) -> None:
        if self.own_forward is None:
            del self.linear.forward  # back to the class's forward: no instance attribute left behind
        else:
            self.linear.forward = self.own_forward

    def packed(self) -> BinarySparseTensor:
        w = self.weight
        with torch.no_grad():
            alpha = w.scale.float() * torch.exp(self.s)
            mu = w.zero_point.float() + w.scale.float() * self.t
        mask, signs = w.unpack()
        return BinarySparseTensor.from_parts(mask, signs, alpha, mu, n=w.n, m=w.m, scale_block=w.scale_block,
                                             dtype=w.scale.dtype)


def block_mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared difference of a block's outputs and their targets over all batches."""
    total = sum(float(F.mse_loss(o.float(), y.float(), reduction="sum")) for o, y in zip(outputs, targets, strict=True))
    return total / max(sum(y.numel() for y in targets), 1)


def tune_block_scales(
    block: torch.nn.Module, linears: dict[str, torch.nn.Linear], inputs: list[torch.Tensor], calls,
    targets: list[torch.Tensor], *, steps: int, lr: float = 1e-2, norms: bool = False,
) -> dict[str, float]:
    """Tune ``α, μ`` of the packed ``linears`` of ``block`` for ``steps`` passes over the batches, in place.

    ``inputs[b]`` and ``calls[b]`` are what the block receives for batch ``b``; ``targets[b]`` the
    output it should produce. Linears whose weight is not a :class:`BinarySparseTensor` are left alone.
    With ``norms`` the block's own 1-D float parameters (norm weights, biases) are tuned as well; they
    stay in full precision, so the storage is unchanged either way.
    Returns the mean training loss of the first and of the last pass.
    """
    params = [_ScaledBinary(lin) for lin in linears.values() if isinstance(lin.weight, BinarySparseTensor)]
    if not params or steps < 1:
        return {"first_pass": float("nan"), "last_pass": float("nan")}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    trained = [p for sb in params for p in (sb.s, sb.t)]
    extra = [p for p in block.parameters() if p.dim() == 1 and p.dtype.is_floating_point] if norms else []
    for p in extra:
        p.requires_grad_(True)
    groups = [{"params": trained}] + ([{"params": extra, "lr": lr * 0.1}] if extra else [])
    opt = torch.optim.Adam(groups, lr=lr)
    for sb in params:
        sb.attach()
    losses: list[list[float]] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                losses.append([])
                for x, call, y in zip(inputs, calls, targets, strict=True):
                    opt.zero_grad(set_to_none=True)
                    out = block(x, *call.args, **call.kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = F.mse_loss(out.float(), y.float())
                    loss.backward()
                    opt.step()
                    losses[-1].append(loss.item())
    finally:
        for sb in params:
            sb.detach()
        for p in extra:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    for sb in params:
        sb.linear.weight = torch.nn.Parameter(sb.packed(), requires_grad=False)
    return {"first_pass": sum(losses[0]) / len(losses[0]), "last_pass": sum(losses[-1]) / len(losses[-1])}
