"""Input observers of the two-step ``quantize_``: ``step="observe"``, forward passes, ``step="convert"``.

The observer of a linear accumulates its input Hessian ``2XXᵀ/n`` and remembers the config it was
attached with; ``convert`` must be given the same config (but for ``step``), and the observers are
removed only once every observed linear is converted.
"""

from __future__ import annotations

import dataclasses

import torch

from .algorithms import HessianAccumulator
from .config import PBS2P


class Observer:
    """A linear's input Hessian accumulator, its forward pre-hook and the config it was attached with."""

    def __init__(self, module: torch.nn.Module, config: PBS2P) -> None:
        self.config = dataclasses.replace(config, step=None)
        self.hessian = HessianAccumulator(module.weight.shape[1], module.weight.device)
        self.handle = module.register_forward_pre_hook(lambda _m, args: self.hessian.add(args[0].detach()))


def attach(module: torch.nn.Module, config: PBS2P) -> None:
    """Start observing ``module``'s inputs (idempotent)."""
    if observer(module) is None:
        module._pbs2p_observer = Observer(module, config)


def observer(module: torch.nn.Module) -> Observer | None:
    """The observer attached to ``module``, if any."""
    return getattr(module, "_pbs2p_observer", None)


def detach(module: torch.nn.Module) -> None:
    """Remove ``module``'s observer and its hook."""
    obs = observer(module)
    if obs is not None:
        obs.handle.remove()
        del module._pbs2p_observer


def check_convert(name: str, module: torch.nn.Module, config: PBS2P) -> torch.Tensor:
    """The Hessian to convert ``module`` with; refuses a missing observer, no inputs, or another config."""
    obs = observer(module)
    if obs is None:
        raise ValueError(f"module '{name}' has no observer: run quantize_ with step='observe' first")
    if obs.hessian.n_samples == 0:
        raise ValueError(f"module '{name}' saw no calibration input between step='observe' and step='convert'")
    given = dataclasses.replace(config, step=None)
    if given != obs.config:
        diff = [f.name for f in dataclasses.fields(given) if getattr(given, f.name) != getattr(obs.config, f.name)]
        raise ValueError(f"module '{name}' was observed with another config (differs in {diff}); "
                         "convert with the config given to step='observe'")
    return obs.hessian.hessian()
