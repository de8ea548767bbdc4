"""``PBS2P``: the configuration object that ``torchao.quantization.quantize_`` applies to a model."""

from __future__ import annotations

from dataclasses import dataclass

from torchao.core.config import AOBaseConfig

from .algorithms.compensation import COMPENSATIONS, METHODS
from .kernels.packing import check_nm

STEPS = (None, "observe", "convert")


@dataclass
class PBS2P(AOBaseConfig):
    """1-bit weights with N:M semi-structured sparsity (PBS²P) for every eligible ``nn.Linear``.

    Each group of ``m`` consecutive inputs of a weight row keeps ``n`` weights; kept weights become
    ``alpha * (+-1) + mu`` with per-row (or per-row-per-``scale_block``) ``alpha`` and ``mu``.
    The weight is replaced by a packed :class:`~pbs2p.BinarySparseTensor`; the module stays an
    ``nn.Linear``.

    Args:
        n: weights kept per group (``1 <= n < m``).
        m: group size (4, 8 or 16).
        method: ``"spbo"`` (progressive pruning with binarization refits, the paper's SPBO) or
            ``"oneshot"`` (prune to N:M once, then binarize; the ablation).
        spbo_steps: number of progressive pruning steps tau; ``None`` means ``m - n`` (one weight
            per group per step).
        refine_rounds: alternating refinement rounds of the binarizer (alpha, mu, signs).
        scale_block: columns sharing one ``(alpha, mu)`` pair; ``None`` means one pair per row.
        block_size: columns per block of second-order error compensation (calibrated mode).
        compensation: ``"column"`` (column by column inside a block, GPTQ/SparseGPT-style),
            ``"block"`` (exact block-wise OBS update onto later blocks), ``"block-diag"`` (BiLLM's
            block-only update) or ``"none"`` (calibrated mode).
        damp: Hessian damping, as a fraction of the mean of its diagonal (calibrated mode).
        cfs: coarse-to-fine search in :func:`pbs2p.calibrate`: each decoder block gets its own N from
            the cosine similarity of its input and output (redundant blocks keep fewer weights), with
            the average kept fraction exactly ``n / m``; ``False`` keeps ``n`` everywhere.
        n_low, n_high: bounds of a block's N under CFS (default ``n - 1`` and ``n + 1``, within
            ``[1, m - 1]``).
        cfs_normalize: how CFS normalises the blocks' importances ``1/c_l``: by their ``"mean"`` (the
            reading in PAPER.md) or their ``"median"`` (robust to a block with ``c ≈ 0``, see
            :func:`pbs2p.algorithms.layer_importance`).
        true_sequential: in :func:`pbs2p.calibrate`, compress a block's linears in stages (q/k/v, o,
            gate/up, down), each stage calibrated on inputs that already pass through the compressed
            earlier stages (default); ``False`` collects every linear's inputs from the uncompressed block.
        fp_target: in :func:`pbs2p.calibrate`, fit each linear to the *full-precision* model's output
            (``min ‖XWᵀ − X̂Ŵᵀ‖``, ``X`` the uncompressed model's inputs, ``X̂`` the actual ones), so
            that each layer also corrects the drift of the compressed layers before it; ``False``
            fits ``min ‖X̂(W − Ŵ)ᵀ‖`` (GPTQ's objective). Costs a second, full-precision forward stream.
        tune_steps: in :func:`pbs2p.calibrate`, passes of Adam over the calibration batches that tune
            every block's ``α, μ`` (masks and signs fixed, storage unchanged) on the block's output
            (:mod:`pbs2p.pipeline.block_tune`); default 3, 0 = off (the paper's method alone).
        tune_lr: Adam's learning rate for the tuning (on ``log α`` and on ``μ/α``).
        tune_target: what a tuned block's output should match: ``"block"`` (the uncompressed block on
            the same inputs) or ``"fp"`` (the full-precision model's hidden states; keeps a second,
            full-precision forward stream).
        tune_norms: also tune the block's own 1-D parameters (norm weights, biases; full precision).
        step: ``None`` converts now without data (H = I); ``"observe"`` attaches input observers,
            and a later ``"convert"`` compresses with the Hessians they collected.
        seed: seed of any random choice, for bit-identical results.

    Example:
        >>> import torch
        >>> from torchao.quantization import quantize_
        >>> from pbs2p import PBS2P, BinarySparseTensor
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> quantize_(model, PBS2P(n=4, m=8))
        >>> isinstance(model[0].weight, BinarySparseTensor), model[0].weight.nm()
        (True, (4, 8))
        >>> model(torch.randn(2, 64)).shape
        torch.Size([2, 8])
    """

    n: int = 4
    m: int = 8
    method: str = "spbo"
    spbo_steps: int | None = None
    refine_rounds: int = 3
    scale_block: int | None = None
    block_size: int = 128
    compensation: str = "column"
    damp: float = 0.01
    cfs: bool = True
    n_low: int | None = None
    n_high: int | None = None
    cfs_normalize: str = "mean"
    true_sequential: bool = True
    fp_target: bool = False
    tune_steps: int = 3
    tune_lr: float = 1e-2
    tune_target: str = "block"
    tune_norms: bool = False
    step: str | None = None
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.spbo_steps is not None and self.spbo_steps < 1:
            raise ValueError(f"spbo_steps must be >= 1, got {self.spbo_steps}")
        if self.refine_rounds < 0:
            raise ValueError(f"refine_rounds must be >= 0, got {self.refine_rounds}")
        for name in ("scale_block", "block_size"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % self.m):
                raise ValueError(f"{name} must be a positive multiple of M = {self.m}, got {value}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {self.compensation!r}")
        if self.cfs_normalize not in ("mean", "median"):
            raise ValueError(f"cfs_normalize must be 'mean' or 'median', got {self.cfs_normalize!r}")
        if self.tune_steps < 0:
            raise ValueError(f"tune_steps must be >= 0, got {self.tune_steps}")
        if not self.tune_lr > 0:
            raise ValueError(f"tune_lr must be > 0, got {self.tune_lr}")
        if self.tune_target not in ("block", "fp"):
            raise ValueError(f"tune_target must be 'block' or 'fp', got {self.tune_target!r}")
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")
        low, high = self.n_bounds()
        if not 1 <= low <= self.n <= high <= self.m - 1:
            raise ValueError(
                f"need 1 <= n_low <= n <= n_high <= m - 1, got n_low={low}, n={self.n}, n_high={high}"
            )
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {self.step!r}")

    def n_bounds(self) -> tuple[int, int]:
        """``(n_low, n_high)`` with the defaults filled in."""
        low = max(1, self.n - 1) if self.n_low is None else self.n_low
        high = min(self.m - 1, self.n + 1) if self.n_high is None else self.n_high
        return low, high
