"""Calibrated compression of whole causal LMs, block by block."""

from .calibrate import CalibrationResult, calibrate, eligible_linears
from .families import decoder_blocks
from .sequential import BlockRecord, LinearCompressor, SequentialRunner

__all__ = [
    "BlockRecord",
    "CalibrationResult",
    "LinearCompressor",
    "SequentialRunner",
    "calibrate",
    "decoder_blocks",
    "eligible_linears",
]
