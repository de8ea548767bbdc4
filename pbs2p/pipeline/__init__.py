"""Calibrated compression of whole causal LMs, block by block."""

from .calibrate import BlockRecord, CalibrationResult, calibrate
from .families import decoder_blocks

__all__ = ["BlockRecord", "CalibrationResult", "calibrate", "decoder_blocks"]
