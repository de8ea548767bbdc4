"""``PBS2P``: the torchao configuration of the packed weight format and of the per-weight method."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from torchao.core.config import AOBaseConfig

from .algorithms.method import COMPENSATIONS, EXTRAS
from .kernels.packing import check_nm

STEPS = (None, "observe", "convert")
#: Options that act only when the weight is compressed with a Hessian (``calibrate``, ``step="convert"``).
CALIBRATED_ONLY = ("compensation", "extras")


@dataclass
class PBS2P(AOBaseConfig):
    """1-bit weights with N:M semi-structured sparsity (PBS²P) for every eligible ``nn.Linear``.

    Each group of ``m`` consecutive inputs of a weight row keeps ``n`` weights; kept weights become
    ``alpha * (+-1) + mu`` with per-row (or per-row-per-``scale_block``) ``alpha`` and ``mu``. The
    weight is replaced by a packed :class:`~pbs2p.BinarySparseTensor`; the module stays an ``nn.Linear``.
    What drives the block-by-block pipeline (CFS, scale tuning, ...) are arguments of
    :func:`pbs2p.calibrate`, not fields here.

    Args:
        n: weights kept per group (``1 <= n < m``).
        m: group size (4, 8 or 16).
        scale_block: columns sharing one ``(alpha, mu)`` pair (a multiple of ``m``); ``None``: one pair per row.
        spbo_steps: SPBO's progressive prune-and-refit steps tau (at most ``m - n``); ``None`` means ``m - n``
            (one weight per group per step); ``0`` turns SPBO off (one-shot: prune by OBS saliency, then
            binarize). A block that CFS gives a larger N, and so fewer weights to prune, takes at most that
            many steps.
        refine_rounds: alternating refinement rounds of the binarizer (alpha, mu, signs).
        compensation: with calibration data only: ``"column"`` (column by column inside blocks of 128,
            GPTQ/SparseGPT-style), ``"block"`` (exact update onto later blocks), ``"block-diag"``
            (BiLLM's block-only update, the paper's) or ``"none"``.
        extras: with calibration data only: the additions beyond the paper to use, a list of any of
            ``"act_order"``, ``"refit"``, ``"obs_weights"`` (see :data:`pbs2p.algorithms.EXTRAS`).
        step: ``None`` converts now; ``"observe"`` attaches input observers, and a later ``"convert"``
            (with otherwise the same config) compresses with the Hessians they collected.

    Example:
        >>> import torch
        >>> from torchao.quantization import quantize_
        >>> from pbs2p import PBS2P, BinarySparseTensor
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> quantize_(model, PBS2P(n=4, m=8))
        >>> isinstance(model[0].weight, BinarySparseTensor), model[0].weight.nm()
        (True, (4, 8))
        >>> PBS2P(n=4, m=8, refine_rounds=2.5)
        Traceback (most recent call last):
        ...
        TypeError: PBS2P.refine_rounds must be an int, got 2.5
    """

    n: int = 4
    m: int = 8
    scale_block: int | None = None
    spbo_steps: int | None = None
    refine_rounds: int = 3
    compensation: str = "column"
    extras: list[str] = field(default_factory=lambda: list(EXTRAS))
    step: str | None = None

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        for name, low in (("scale_block", 1), ("spbo_steps", 0), ("refine_rounds", 0)):
            value = getattr(self, name)
            if value is None and name != "refine_rounds":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"PBS2P.{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"PBS2P.{name} must be >= {low}, got {value}")
        if self.spbo_steps is not None and self.spbo_steps > self.m - self.n:
            raise ValueError(f"PBS2P.spbo_steps must be <= m - n = {self.m - self.n} (one weight per group per step "
                             f"at most), got {self.spbo_steps}")
        if self.scale_block is not None and self.scale_block % self.m:
            raise ValueError(f"PBS2P.scale_block must be a multiple of m = {self.m}, got {self.scale_block}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"PBS2P.compensation must be one of {COMPENSATIONS}, got {self.compensation!r}")
        extras = self.extras
        if not isinstance(extras, (list, tuple)) or not all(isinstance(e, str) for e in extras):
            raise TypeError(f"PBS2P.extras must be a list of names from {EXTRAS}, got {extras!r}")
        unknown = sorted(set(extras) - set(EXTRAS))
        if unknown:
            raise ValueError(f"PBS2P.extras: unknown {unknown}; known: {EXTRAS}")
        self.extras = [e for e in EXTRAS if e in extras]  # canonical order, no duplicates
        if self.step not in STEPS:
            raise ValueError(f"PBS2P.step must be one of {STEPS}, got {self.step!r}")

    def non_default(self, names: tuple[str, ...]) -> list[str]:
        """Which of ``names`` differ from their defaults (to refuse options an entry point would ignore)."""
        defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]
