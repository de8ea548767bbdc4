"""Real activations for layer-level measurements: two disjoint token sets and per-linear input Hessians.

* :func:`token_sets` draws the **calibration** windows from the calibration part of the Wikipedia split
  and the **held-out** windows from its held-out part (:mod:`pbs2p_lab.data.split`: disjoint at article
  granularity), each with :func:`pbs2p_lab.data.calibration.sample_segments` and a seed;
  :func:`shared_ngrams` counts token n-grams the two sets have in common (recorded as a check).
* :func:`capture_hessians` runs the **full-precision** model once per batch with a pre-hook on every
  linear of every decoder block and accumulates ``H = 2·XᵀX / n`` of each linear's input (linears fed
  the same tensor — q/k/v, gate/up — share one accumulator). The forward stops after the last block (the
  final norm and the LM head are never run). Per batch ``XᵀX`` is computed in float32 and summed in float64.

Layer-level measurements built on these Hessians are *in isolation*: every linear sees the inputs of the
uncompressed model, so every method is compared on the same inputs (see ``benchmarks/layer_error.py``).

Example::

    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.split import load_split
    model, tok = load_model("tiny")
    sets = token_sets(tok, load_split(), n_cal=2, n_eval=2, seqlen=64, seed=0)
    H = capture_hessians(model, sets.calibration)        # {"0.self_attn.q_proj": [16, 16], ...}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pbs2p.pipeline import decoder_blocks
from pbs2p_lab.data.calibration import sample_segments, tokenize_text
from pbs2p_lab.data.split import TextSplit

__all__ = ["TokenSets", "capture_hessians", "decoder_linears", "linear_type", "shared_ngrams", "token_sets"]


@dataclass(frozen=True)
class TokenSets:
    """Calibration windows (compression sees these) and held-out windows (errors are measured on these)."""

    calibration: torch.Tensor  # LongTensor [n_cal, seqlen], from split.calibration_text
    heldout: torch.Tensor  # LongTensor [n_eval, seqlen], from split.heldout_text
    record: dict  # JSON-ready provenance


def token_sets(
    tokenizer, split: TextSplit, *, n_cal: int, n_eval: int, seqlen: int, seed: int = 0, ngram: int = 32
) -> TokenSets:
    """Seeded windows from the two parts of ``split``; the record says where each came from.

    The held-out windows come from held-out articles only (never from calibration text), so no token
    of them was seen by the compressor; ``record["shared_ngrams"]`` counts the ``ngram``-token sequences
    of the held-out windows that also occur in the calibration windows (boilerplate aside: 0).
    """
    cal_ids = tokenize_text(tokenizer, split.calibration_text)
    held_ids = tokenize_text(tokenizer, split.heldout_text)
    cal = sample_segments(cal_ids, n_cal, seqlen, seed)
    held = sample_segments(held_ids, n_eval, seqlen, seed)
    record = {
        "calibration": {
            "source": "calibration part of the Wikipedia split",
            "windows": n_cal,
            "seqlen": seqlen,
            "seed": seed,
            "articles": len(split.calibration),
            "stream_tokens": int(cal_ids.numel()),
        },
        "heldout": {
            "source": "held-out part of the Wikipedia split",
            "windows": n_eval,
            "seqlen": seqlen,
            "seed": seed,
            "articles": len(split.heldout),
            "stream_tokens": int(held_ids.numel()),
        },
        "sampler": "pbs2p_lab.data.calibration.sample_segments (uniform random offsets, seeded)",
        "split_rule": split.describe()["rule"],
        "shared_ngrams": {"n": ngram, "count": shared_ngrams(cal, held, ngram)},
    }
    return TokenSets(cal, held, record)


def shared_ngrams(a: torch.Tensor, b: torch.Tensor, n: int = 32) -> int:
    """How many ``n``-token windows of the rows of ``b`` also occur in the rows of ``a`` (exact match)."""

    def grams(t: torch.Tensor) -> list[tuple[int, ...]]:
        out = []
        for row in t.reshape(-1, t.shape[-1]).tolist():
            out += [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        return out

    seen = set(grams(a))
    return sum(g in seen for g in grams(b))


def linear_type(name: str) -> str:
    """Short type of a decoder linear: ``"self_attn.q_proj"`` → ``"q"``, ``"mlp.down_proj"`` → ``"down"``."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf[:-5] if leaf.endswith("_proj") else leaf


def decoder_linears(model: torch.nn.Module) -> list[tuple[int, str, torch.nn.Linear]]:
    """``(block index, name inside the block, module)`` of every ``nn.Linear`` of every decoder block."""
    return [
        (i, name, mod)
        for i, block in enumerate(decoder_blocks(model))
        for name, mod in block.named_modules()
        if isinstance(mod, torch.nn.Linear)
    ]


class _Stop(Exception):
    """Raised after the last decoder block: nothing after it is needed."""


@torch.no_grad()
def capture_hessians(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """``{"<block>.<name>": H}`` with ``H = 2·XᵀX/n`` of every decoder linear's input on ``tokens``.

    ``tokens`` is ``LongTensor [windows, seqlen]``. Linears fed the very same tensor share one
    ``H`` object (no copy). Float32 ``[in, in]`` results.
    """
    linears = decoder_linears(model)
    if not linears:
        raise ValueError("the model has no nn.Linear inside its decoder blocks")
    sums: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    counts: dict[str, int] = {}
    last: list = [None, None]  # (input tensor, its owner) of the previous linear call

    def hook(key: str):
        def pre(_module, args):
            x = args[0]
            if last[0] is x:
                owner.setdefault(key, last[1])
                return
            owner.setdefault(key, key)
            x2 = x.reshape(-1, x.shape[-1]).float()
            part = (x2.T @ x2).double()
            if key in sums:
                sums[key] += part
            else:
                sums[key] = part
            counts[key] = counts.get(key, 0) + x2.shape[0]
            last[0], last[1] = x, key

        return pre

    def stop(*_):
        raise _Stop

    handles = [mod.register_forward_pre_hook(hook(f"{i}.{name}")) for i, name, mod in linears]
    handles.append(decoder_blocks(model)[-1].register_forward_hook(stop))
    try:
        for chunk in tokens.split(batch_size):
            last[0] = last[1] = None
            with contextlib.suppress(_Stop):
                model(chunk.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hessians = {k: (2.0 * s / counts[k]).float() for k, s in sums.items()}
    return {f"{i}.{name}": hessians[owner[f"{i}.{name}"]] for i, name, _ in linears}
