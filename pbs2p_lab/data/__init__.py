"""Text data: packaged English Wikipedia, its calibration / held-out split, and the calibration sampler."""
