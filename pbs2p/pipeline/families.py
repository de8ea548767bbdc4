"""The only place that knows transformers' module names: where each model family keeps its decoder blocks."""

from __future__ import annotations

import torch

# model_type -> attribute path of the decoder blocks (an nn.ModuleList)
DECODER_BLOCKS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM, in execution order.

    Known families are looked up by ``config.model_type``; any other model must have exactly one
    ``nn.ModuleList`` of blocks holding linears, which is then used.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = DECODER_BLOCKS.get(model_type)
    if path is not None:
        blocks = model.get_submodule(path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks
    lists = [
        mod
        for mod in model.modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1 and any(_has_linear(b) for b in mod)
    ]
    if len(lists) != 1:
        raise ValueError(
            f"cannot find the decoder blocks of this {type(model).__name__} (model_type={model_type!r}); "
            f"known families: {sorted(DECODER_BLOCKS)}"
        )
    return lists[0]


def _has_linear(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Linear) or is_conv1d(m) for m in module.modules())


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linears_as_nn_linear(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace GPT-2's ``Conv1D`` modules in ``block`` by equivalent ``nn.Linear`` (same outputs).

    Returns ``(parent, name, replaced module)`` of every replacement, to undo it.
    """
    replaced = []
    for name, child in list(block.named_children()):
        if is_conv1d(child):
            weight = child.weight
            linear = torch.nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                linear.bias.copy_(child.bias)
            setattr(block, name, linear)
            replaced.append((block, name, child))
        else:
            replaced += linears_as_nn_linear(child)
    return replaced
