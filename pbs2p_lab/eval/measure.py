"""One result entry for a model state: held-out perplexity, optional zero-shot scores, size, bits/weight.

Example::

    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.split import load_split
    from pbs2p_lab.eval.measure import measure_entry
    model, tok = load_model("tiny")
    entry = measure_entry(model, tok, label="fp32", method="fp", split=load_split(), seqlen=128, ppl_limit=2)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pbs2p_lab.data.calibration import tokenize_text
from pbs2p_lab.data.split import TextSplit
from pbs2p_lab.eval.perplexity import perplexity
from pbs2p_lab.eval.results import model_size_bytes

__all__ = ["measure_entry"]


def measure_entry(
    model: torch.nn.Module,
    tokenizer,
    *,
    label: str,
    method: str,
    split: TextSplit,
    seqlen: int = 2048,
    ppl_limit: int | None = None,
    measure_ppl: bool = True,
    tasks: Sequence[str] = (),
    task_limit: int | None = None,
    batch_size: int = 8,
    nm: str | None = None,
    config: dict | None = None,
    bits_per_weight: float | None = None,
    bits_per_weight_kept: float | None = None,
    per_layer: list[dict] | None = None,
    wall_s: dict[str, float] | None = None,
    progress: bool = True,
) -> dict:
    """Measure ``model`` and return a result entry (see :mod:`pbs2p_lab.eval.results`).

    ``bits_per_weight`` defaults to the storage bits of the decoder linears' dtype for an uncompressed
    model (32 for float32); pass the compressed value otherwise.
    """
    wall = dict(wall_s or {})
    ppl_record = None
    if measure_ppl:
        ids = tokenize_text(tokenizer, split.heldout_text)
        ppl = perplexity(model, ids, seqlen=seqlen, limit=ppl_limit, progress=progress)
        wall["ppl"] = ppl.wall_s
        ppl_record = {**ppl.to_dict(), "heldout_tokens": int(ids.numel())}
    zeroshot = None
    if tasks:
        from pbs2p_lab.eval.zeroshot import evaluate_tasks

        zeroshot = evaluate_tasks(model, tokenizer, tasks, limit=task_limit, batch_size=batch_size)
        wall["zeroshot"] = zeroshot["wall_s"]
    if bits_per_weight is None:
        bits_per_weight = 8.0 * next(model.parameters()).element_size()
    return {
        "label": label,
        "method": method,
        "nm": nm,
        "config": config,
        "bits_per_weight": bits_per_weight,
        "bits_per_weight_kept": bits_per_weight_kept,
        "size_mb": model_size_bytes(model) / 1e6,
        "perplexity": ppl_record,
        "zeroshot": zeroshot,
        "per_layer": per_layer,
        "wall_s": wall,
    }
