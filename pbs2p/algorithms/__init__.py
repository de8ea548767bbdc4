"""The method, as pure tensor math (no ``nn.Module``, no transformers).

* :mod:`~pbs2p.algorithms.method` — one weight: binarizer, SPBO, OBS selection, compensation;
* :mod:`~pbs2p.algorithms.hessian` — the layer Hessian and output errors under it;
* :mod:`~pbs2p.algorithms.cfs` — CFS's coarse search: how many weights each decoder block keeps.
"""

from .cfs import allocate_n, layer_importance
from .hessian import HessianAccumulator, prepare_hessian, relative_output_error
from .method import EXTRAS, BinarizedWeight, compress

__all__ = [
    "EXTRAS",
    "BinarizedWeight",
    "HessianAccumulator",
    "allocate_n",
    "compress",
    "layer_importance",
    "prepare_hessian",
    "relative_output_error",
]
