"""Token streams and the seeded calibration sampler (GPTQ / SparseGPT style).

The calibration set is ``nsamples`` segments of ``seqlen`` tokens, each starting at an offset drawn
uniformly at random from the tokenized calibration text (segments may overlap, as in the GPTQ loaders).
The same seed gives the same tensor on every machine: offsets come from a seeded ``torch.Generator``.

Example::

    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.calibration import calibration_tokens
    _, tok = load_model("tiny")
    x = calibration_tokens(tok, nsamples=4, seqlen=128, seed=0)   # LongTensor [4, 128]
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from pbs2p.pipeline.text import sample_segments  # the library's sampler (also behind pbs2p.calibration_tokens)
from pbs2p_lab.assets import cache_dir
from pbs2p_lab.data.split import TextSplit, load_split

#: Default calibration size: 8 segments of 2048 tokens (16,384 tokens). The whole compression of
#: SmolLM2-135M stays within 10 minutes on a 2-core CPU with it (``benchmarks/quality.py``); fewer
#: segments change CFS's per-block N in several blocks (``benchmarks/cfs_samples.py``).
DEFAULT_NSAMPLES = 8

__all__ = ["calibration_tokens", "describe_calibration", "sample_segments", "tokenize_text"]


def _tokenizer_fingerprint(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers only
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def tokenize_text(tokenizer, text: str, cache: bool = True) -> torch.Tensor:
    """Tokenize a whole text stream in one call, without special tokens; returns a 1-D LongTensor.

    Tokenizing ~1.5 MB as one string takes 1-20 s depending on the tokenizer (SentencePiece-style
    tokenizers that do not pre-split are superlinear), so with ``cache=True`` the ids of fast tokenizers
    are cached under ``<cache>/tokens/``, keyed by the sha256 of the tokenizer's full definition and of
    the text. Slow (Python) tokenizers are not cached.
    """
    fingerprint = _tokenizer_fingerprint(tokenizer) if cache else None
    path = None
    if fingerprint is not None:
        text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        path = cache_dir() / "tokens" / f"{fingerprint[:20]}-{text_sha[:20]}.pt"
        if path.exists():
            return torch.load(path, weights_only=True).to(torch.long)
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(encoded, dtype=torch.long)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ids.to(torch.int32), tmp)  # vocabularies are far below 2**31; halves the file
        os.replace(tmp, path)
    return ids


def calibration_tokens(
    tokenizer, nsamples: int = DEFAULT_NSAMPLES, seqlen: int = 2048, seed: int = 0, split: TextSplit | None = None
) -> torch.Tensor:
    """Seeded calibration segments [nsamples, seqlen] from the calibration part of the Wikipedia split
    (the default calibration text; :func:`pbs2p.calibration_tokens` makes them from any other text)."""
    split = split if split is not None else load_split()
    return sample_segments(tokenize_text(tokenizer, split.calibration_text), nsamples, seqlen, seed)


def describe_calibration(nsamples: int, seqlen: int, seed: int, split: TextSplit,
                         text_file: str | os.PathLike[str] | None = None, dataset: dict | None = None) -> dict:
    """JSON-ready description of a calibration set drawn with :func:`calibration_tokens` (or, from
    ``text_file`` or a ``dataset`` described by :func:`~pbs2p_lab.data.text_dataset.describe_text_dataset`,
    with :func:`pbs2p.calibration_tokens`)."""
    sampler = {
        "sampler": "uniform random start offsets, torch.Generator().manual_seed(seed), overlap allowed",
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
    }
    if dataset is not None:
        return {**dataset, **sampler}
    if text_file is not None:
        data = Path(text_file).read_bytes()
        return {"source": f"text file {text_file}", **sampler, "text_file_sha256": hashlib.sha256(data).hexdigest(),
                "text_file_bytes": len(data)}
    return {
        "source": "calibration part of the packaged English Wikipedia split (pbs2p_lab.data.split)",
        **sampler,
        "calibration_articles": len(split.calibration),
    }
