"""Calibrated compression of whole causal LMs, block by block."""

from .calibrate import CFS, CalibrationResult, calibrate, eligible_linears
from .families import decoder_blocks
from .scale_tuning import ScaleTuning
from .sequential import BlockRecord, Compressed, LinearCompressor, SequentialRunner

__all__ = [
    "CFS",
    "BlockRecord",
    "CalibrationResult",
    "Compressed",
    "LinearCompressor",
    "ScaleTuning",
    "SequentialRunner",
    "calibrate",
    "decoder_blocks",
    "eligible_linears",
]
