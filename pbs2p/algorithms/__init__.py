"""The method, as pure tensor math (no ``nn.Module``, no transformers).

* :mod:`~pbs2p.algorithms.method` — one weight: the Hessian's factor, binarizer, SPBO, OBS selection,
  compensation (the whole calibrated path of one weight);
* :mod:`~pbs2p.algorithms.hessian` — a layer's Hessian accumulated from its inputs, output errors;
* :mod:`~pbs2p.algorithms.cfs` — CFS's coarse search: how many weights each decoder block keeps.
"""

from .cfs import allocate_n, layer_importance
from .hessian import HessianAccumulator, relative_output_error
from .method import EXTRAS, BinarizedWeight, compress, prepare_hessian

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
