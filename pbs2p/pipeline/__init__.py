"""Calibrated compression of whole causal LMs, block by block (in memory, or read from disk)."""

from .activations import Activations
from .blocks import BlockSource, InMemoryBlocks
from .calibrate import CFS, CalibrationResult, calibrate, eligible_linears
from .checkpoint import Checkpoint, CheckpointBlocks
from .families import decoder_blocks
from .ranks import Ranks
from .scale_tuning import ScaleTuning
from .sequential import BlockRecord, Compressed, LinearCompressor, SequentialRunner
from .text import calibration_tokens

__all__ = [
    "CFS",
    "Activations",
    "BlockRecord",
    "BlockSource",
    "CalibrationResult",
    "Checkpoint",
    "CheckpointBlocks",
    "Compressed",
    "InMemoryBlocks",
    "LinearCompressor",
    "Ranks",
    "ScaleTuning",
    "SequentialRunner",
    "calibrate",
    "calibration_tokens",
    "decoder_blocks",
    "eligible_linears",
]
