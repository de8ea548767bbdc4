"""Input observers for the two-step ``quantize_`` workflow: ``step="observe"``, forward passes, ``step="convert"``."""

from __future__ import annotations

import torch


class HessianObserver:
    """Running ``H = 2 X Xᵀ / n_tokens`` (float32) of the inputs a linear sees, as GPTQ/SparseGPT use."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` ``[..., in_features]`` to the running mean."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if x.shape[0] == 0:
            return
        total = self.tokens + x.shape[0]
        self.hessian.mul_(self.tokens / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total


def _pre_hook(module: torch.nn.Module, args: tuple) -> None:
    module._pbs2p_observer.update(args[0])


def attach_observer(module: torch.nn.Module) -> None:
    """Start accumulating the input Hessian of ``module`` (a linear) on every forward."""
    if getattr(module, "_pbs2p_observer", None) is not None:
        return
    module._pbs2p_observer = HessianObserver(module.weight.shape[1], module.weight.device)
    module._pbs2p_hook = module.register_forward_pre_hook(_pre_hook)


def pop_hessian(module: torch.nn.Module) -> torch.Tensor:
    """Detach the observer of ``module`` and return its Hessian; refuse if it saw no input."""
    observer: HessianObserver = module._pbs2p_observer
    module._pbs2p_hook.remove()
    del module._pbs2p_observer, module._pbs2p_hook
    if observer.tokens == 0:
        raise ValueError(
            f"the observer of {type(module).__name__}{tuple(module.weight.shape)} saw no input: run forward "
            "passes on calibration data between step='observe' and step='convert'"
        )
    return observer.hessian
