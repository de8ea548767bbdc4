"""Input observers for the two-step ``quantize_`` workflow: ``step="observe"``, forward passes, ``step="convert"``."""

from __future__ import annotations

import torch

from .algorithms import HessianAccumulator


def _pre_hook(module: torch.nn.Module, args: tuple) -> None:
    module._pbs2p_observer.add(args[0].detach())


def attach_observer(module: torch.nn.Module) -> None:
    """Start accumulating the input Hessian ``2XXᵀ/n`` of ``module`` (a linear) on every forward."""
    if getattr(module, "_pbs2p_observer", None) is not None:
        return
    module._pbs2p_observer = HessianAccumulator(module.weight.shape[1], module.weight.device)
    module._pbs2p_hook = module.register_forward_pre_hook(_pre_hook)


def observed_tokens(module: torch.nn.Module) -> int | None:
    """Input rows the observer of ``module`` has seen (``None`` if it has no observer)."""
    observer = getattr(module, "_pbs2p_observer", None)
    return None if observer is None else observer.n_samples


def pop_hessian(module: torch.nn.Module) -> torch.Tensor:
    """Detach the observer of ``module`` and return its Hessian."""
    observer: HessianAccumulator = module._pbs2p_observer
    module._pbs2p_hook.remove()
    del module._pbs2p_observer, module._pbs2p_hook
    return observer.hessian()
