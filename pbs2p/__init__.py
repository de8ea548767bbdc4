"""pbs2p: 1-bit weights with N:M semi-structured sparsity (PBS²P) for PyTorch, packed and fast.

>>> import torch
>>> from torchao.quantization import quantize_
>>> from pbs2p import PBS2P
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> quantize_(model, PBS2P(n=4, m=8))
>>> model[0].weight.nm()
(4, 8)
"""

from . import interop
from .config import PBS2P
from .embeddings import EmbeddingsReport, int8_embeddings_
from .generation import Generation, Generator, generate
from .kernels.fusion import FusePackedLinears
from .pipeline import CFS, CalibrationResult, Checkpoint, ScaleTuning, calibrate, calibration_tokens
from .quantize import ConversionReport, compress_weight, conversion_report, quantize_
from .tensor import BinarySparseTensor

interop.register()

__version__ = "0.2.0"

__all__ = [
    "CFS",
    "PBS2P",
    "BinarySparseTensor",
    "CalibrationResult",
    "Checkpoint",
    "ConversionReport",
    "EmbeddingsReport",
    "FusePackedLinears",
    "Generation",
    "Generator",
    "ScaleTuning",
    "calibrate",
    "calibration_tokens",
    "compress_weight",
    "conversion_report",
    "generate",
    "int8_embeddings_",
    "quantize_",
]
