"""Registrations that let torch, torchao and transformers load what pbs2p writes — and refuse damage.

Each of these libraries refuses to rebuild classes it does not know, on purpose (a checkpoint must
not run arbitrary code). They keep allowlists, and :func:`register` adds pbs2p's two classes to them,
once, at ``import pbs2p``:

* ``torch.load(..., weights_only=True)``: :class:`BinarySparseTensor` and :class:`PBS2P` as safe globals;
* torchao's safetensors support (used by transformers' ``save_pretrained``/``from_pretrained``):
  the tensor class by name in ``ALLOWED_TENSORS_SUBCLASSES`` / ``ALLOWED_CLASSES``;
* torchao's ``config_from_dict`` (used by transformers' ``TorchAoConfig``): the module ``pbs2p``
  in ``ALLOWED_AO_MODULES``.

transformers gathers a weight's inner tensors by the torchao names ``qdata``/``scale``/``zero_point``,
which is why :class:`BinarySparseTensor` uses them. But when a checkpoint lacks a weight's tensors,
transformers initializes that weight at random and only logs it; for a compressed model that is never
right, so :func:`register` also makes transformers' torchao loader call :func:`verify_loaded` after
loading a PBS²P checkpoint, which refuses missing, damaged or mis-shaped weights.
``tests/test_interop.py`` fails loudly if a new torchao or transformers release moves any of this.
"""

from __future__ import annotations

import json

import torch
from torchao.core import config as ao_config
from torchao.prototype.safetensors import safetensors_utils

from .config import PBS2P
from .tensor import BinarySparseTensor


def verify_loaded(model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` unless every packed weight of ``model`` is present and has its module's shape.

    ``metadata`` is the safetensors metadata of the checkpoint (torchao's format): every tensor it lists
    as a :class:`BinarySparseTensor` must have been loaded as one.
    """
    problems = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, BinarySparseTensor):
            expected = (module.out_features, module.in_features)
            if tuple(weight.shape) != expected:
                problems.append(f"{name}.weight is {tuple(weight.shape)}, the model expects {expected}")
    if metadata:
        for key in json.loads(metadata.get("tensor_names", "[]")):
            entry = metadata.get(key)
            if entry is None:
                problems.append(f"{key} has no metadata")
            elif json.loads(entry).get("_type") == BinarySparseTensor.__name__:
                try:
                    loaded = model.get_parameter(key)
                except AttributeError:
                    loaded = None
                if not isinstance(loaded, BinarySparseTensor):
                    problems.append(
                        f"{key} is packed in the checkpoint but was not loaded (missing or damaged tensors)"
                    )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"refusing this pbs2p checkpoint, it is damaged or incomplete: {shown}")


def mark_hf_quantized(model: torch.nn.Module, config: PBS2P) -> None:
    """Let a transformers model compressed in place be saved with ``save_pretrained``.

    transformers writes torchao tensors (safetensors with torchao's metadata) only for a model that
    carries a torchao quantizer, which ``from_pretrained(..., quantization_config=TorchAoConfig(...))``
    attaches; a model compressed by :func:`pbs2p.quantize_` or :func:`pbs2p.calibrate` gets the same
    here. ``config.json`` then records the :class:`PBS2P` used, and ``from_pretrained`` reloads the
    packed weights as they are. Models that are not transformers models are left alone.
    """
    from transformers import PreTrainedModel, TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if not isinstance(model, PreTrainedModel):
        return
    quantization_config = TorchAoConfig(quant_type=config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = TorchAoHfQuantizer(quantization_config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = quantization_config.quant_method


def _patch_transformers_loader() -> None:
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if getattr(TorchAoHfQuantizer, "_pbs2p_verifies", False):
        return
    original = TorchAoHfQuantizer._process_model_after_weight_loading

    def after_loading(self, model, **kwargs):
        model = original(self, model, **kwargs)
        if isinstance(self.quantization_config.quant_type, PBS2P):
            verify_loaded(model, getattr(self, "metadata", None) if self.pre_quantized else None)
        return model

    TorchAoHfQuantizer._process_model_after_weight_loading = after_loading
    TorchAoHfQuantizer._pbs2p_verifies = True


def register() -> None:
    """Allowlist :class:`BinarySparseTensor` and :class:`PBS2P` for safe loading (idempotent)."""
    torch.serialization.add_safe_globals([BinarySparseTensor, PBS2P])
    name = BinarySparseTensor.__name__
    safetensors_utils.ALLOWED_CLASSES[name] = BinarySparseTensor
    if name not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
        safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append(name)
    ao_config.ALLOWED_AO_MODULES.add("pbs2p")
    _patch_transformers_loader()
