"""Pure-tensor math of PBS²P and its baselines (no nn.Module, no transformers).

Everything takes a weight ``W`` ``[out, in]`` and optionally the layer's input Hessian ``H = 2XXᵀ/n``
``[in, in]`` and returns tensors. The entry point is :func:`compress_weight`.
"""

from .allocation import allocate_n, layer_importance
from .binarize import binarize, fit_binary
from .binarized import BinarizedWeight, honest_bits_per_weight, nm_index_bits
from .budget import allocate_bits as allocate_bits
from .compress import compress_weight
from .hessian import HessianAccumulator, hessian_from_inputs, prepare_hessian
from .metrics import relative_output_error
from .nm_mask import is_nm, nm_mask_from_scores
from .saliency import magnitude_saliency, obs_saliency, stbllm_saliency
from .spbo import oneshot_select, spbo_select

__all__ = [
    "BinarizedWeight",
    "HessianAccumulator",
    "allocate_n",
    "binarize",
    "compress_weight",
    "fit_binary",
    "hessian_from_inputs",
    "honest_bits_per_weight",
    "is_nm",
    "layer_importance",
    "magnitude_saliency",
    "nm_index_bits",
    "nm_mask_from_scores",
    "obs_saliency",
    "oneshot_select",
    "prepare_hessian",
    "relative_output_error",
    "spbo_select",
    "stbllm_saliency",
]
