"""Registrations that let torch, torchao and transformers load what pbs2p writes.

Each of these libraries refuses to rebuild classes it does not know, on purpose (a checkpoint must
not run arbitrary code). They keep allowlists, and :func:`register` adds pbs2p's two classes to them,
once, at ``import pbs2p``:

* ``torch.load(..., weights_only=True)``: :class:`BinarySparseTensor` and :class:`PBS2P` as safe globals;
* torchao's safetensors support (used by transformers' ``save_pretrained``/``from_pretrained``):
  the tensor class by name in ``ALLOWED_TENSORS_SUBCLASSES`` / ``ALLOWED_CLASSES``;
* torchao's ``config_from_dict`` (used by transformers' ``TorchAoConfig``): the module ``pbs2p``
  in ``ALLOWED_AO_MODULES``.

transformers itself needs nothing: it gathers a weight's inner tensors by the torchao names
``qdata``/``scale``/``zero_point``, which is why :class:`BinarySparseTensor` uses them.
``tests/test_interop.py`` fails loudly if a new torchao or transformers release moves these lists.
"""

from __future__ import annotations

import torch
from torchao.core import config as ao_config
from torchao.prototype.safetensors import safetensors_utils

from .config import PBS2P
from .tensor import BinarySparseTensor


def register() -> None:
    """Allowlist :class:`BinarySparseTensor` and :class:`PBS2P` for safe loading (idempotent)."""
    torch.serialization.add_safe_globals([BinarySparseTensor, PBS2P])
    name = BinarySparseTensor.__name__
    safetensors_utils.ALLOWED_CLASSES[name] = BinarySparseTensor
    if name not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
        safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append(name)
    ao_config.ALLOWED_AO_MODULES.add("pbs2p")
