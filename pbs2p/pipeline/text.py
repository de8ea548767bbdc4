"""Calibration tokens from text: raw text, a text file, a list of strings, or a dataset's text column.

:func:`pbs2p.calibrate` takes token ids; :func:`calibration_tokens` makes them from text with the model's own
tokenizer (GPTQ / SparseGPT style: seeded random windows of the tokenized text). Datasets are duck-typed
(``datasets`` is not imported): anything iterable whose items are strings or rows (mappings) with a text
column, e.g. a ``datasets.Dataset`` or ``IterableDataset``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

__all__ = ["TEXT_SEPARATOR", "calibration_tokens", "refuse_text", "sample_segments"]

#: What joins the texts of a list or of a dataset's rows into one stream (as articles are joined).
TEXT_SEPARATOR = "\n\n"


def sample_segments(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random ``seqlen``-token windows of a 1-D token stream, as a LongTensor [nsamples, seqlen].

    Start offsets are ``torch.randint(0, len - seqlen + 1)`` from a generator seeded with ``seed``: the same
    seed gives the same windows on every machine (windows may overlap, as in the GPTQ loaders).

    Example:
        >>> import torch
        >>> from pbs2p.pipeline.text import sample_segments
        >>> sample_segments(torch.arange(100), nsamples=2, seqlen=4, seed=0).shape
        torch.Size([2, 4])
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples}, {seqlen}")
    n = token_ids.numel()
    if n < seqlen:
        raise ValueError(f"the calibration text has {n} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    offsets = starts[:, None] + torch.arange(seqlen)[None, :]
    return token_ids[offsets].to(torch.long)


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a missing file, a folder or non-UTF-8 bytes are refused naming the cause."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"calibration text file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ValueError(f"calibration text file {path} is a folder, not a text file") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"calibration text file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _row_text(item: object, i: int, column: str) -> str:
    if isinstance(item, Mapping):
        if column not in item:
            raise ValueError(f"calibration row {i} has no {column!r} column (its keys: {sorted(map(str, item))}); "
                             "name the text column with column=")
        item = item[column]
    if not isinstance(item, str):
        raise TypeError(f"calibration item {i} has type {type(item).__name__}, not str (nor is it a row with a "
                        f"str {column!r} column)")
    return item


def _text(data: object, column: str) -> str:
    """One text stream of ``data`` (see :func:`calibration_tokens`)."""
    if isinstance(data, str):
        return data
    if isinstance(data, os.PathLike):
        return read_text_file(Path(data))
    if isinstance(data, torch.Tensor):
        raise TypeError("calibration data is already a tensor (token ids?): pass token ids to calibrate directly")
    if isinstance(data, bytes | bytearray):
        raise TypeError("calibration data is bytes: decode it to a str first")
    columns = getattr(data, "column_names", None)
    if isinstance(columns, Mapping):  # a datasets.DatasetDict
        raise TypeError(f"calibration data has splits {sorted(columns)}: pick one, e.g. data['train']")
    if isinstance(data, Mapping):
        raise TypeError(f"calibration data is a {type(data).__name__} (one row, or a dataset's splits "
                        f"{sorted(map(str, data))[:5]}?): pass the text, a list of texts, or one split such as "
                        "data['train']")
    if isinstance(columns, list | tuple) and column not in columns:
        raise ValueError(f"the calibration dataset has no {column!r} column (its columns: {list(columns)}); "
                         "name the text column with column=")
    if not isinstance(data, Iterable):
        raise TypeError(f"calibration data must be a str, a path to a text file, a list of strings or a dataset "
                        f"with a {column!r} column, got {type(data).__name__}")
    return TEXT_SEPARATOR.join(_row_text(item, i, column) for i, item in enumerate(data))


def calibration_tokens(data: object, tokenizer, nsamples: int = 8, seqlen: int = 2048, seed: int = 0, *,
                       column: str = "text") -> torch.Tensor:
    """Calibration token ids ``LongTensor [nsamples, seqlen]`` for :func:`pbs2p.calibrate`, from text.

    Args:
        data: the text: a ``str`` (the text itself), a :class:`pathlib.Path` (or other path object) of a UTF-8
            text file, a list of strings, or a dataset: any iterable of rows with a text ``column`` (a
            ``datasets.Dataset`` or ``IterableDataset``, a list of dicts). Texts are joined with
            ``"\\n\\n"`` and the whole stream is read, so pass a slice of a large dataset
            (``ds.select(range(1000))``, ``ds.take(1000)``).
        tokenizer: the model's tokenizer (a transformers tokenizer); the text is tokenized without special
            tokens.
        nsamples, seqlen: how many windows of how many tokens; the text must hold at least
            ``nsamples * seqlen`` tokens.
        seed: seed of the window offsets (uniform, from a seeded ``torch.Generator``; windows may overlap).
        column: the text column of a dataset's rows.

    Refused with the cause: empty text, too little text for ``nsamples * seqlen`` tokens, a missing text
    file or column, items that are not text, and data that is not text at all.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> from pbs2p import calibration_tokens
        >>> byte_level = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
        >>> backend = Tokenizer(models.BPE(byte_level, merges=[]))
        >>> backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)   # one token per byte
        >>> calibration_tokens("The quick brown fox jumps over the lazy dog. " * 4, tokenizer, 2, 16).shape
        torch.Size([2, 16])
        >>> calibration_tokens(["first text", "second text"], tokenizer, nsamples=1, seqlen=8).dtype
        torch.int64
        >>> calibration_tokens([{"text": "a"}, {"text": 3}], tokenizer, 1, 1)
        Traceback (most recent call last):
        ...
        TypeError: calibration item 1 has type int, not str (nor is it a row with a str 'text' column)
    """
    for name, value, low in (("nsamples", nsamples, 1), ("seqlen", seqlen, 1), ("seed", seed, None)):
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
            raise ValueError(f"calibration_tokens: {name} must be an int{f' >= {low}' if low else ''}, got {value!r}")
    if not isinstance(column, str):
        raise TypeError(f"calibration_tokens: column must be a str, got {type(column).__name__}")
    if not callable(tokenizer):
        raise TypeError(f"calibration_tokens: tokenizer must be the model's tokenizer (a transformers tokenizer), "
                        f"got {type(tokenizer).__name__}")
    text = _text(data, column)
    if not text.strip():
        raise ValueError("the calibration text is empty")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.dim() != 1:
        raise TypeError(f"the tokenizer returned ids of shape {tuple(ids.shape)} for one text, not a 1-D list")
    need = nsamples * seqlen
    if ids.numel() < need:
        hint = ""
        if isinstance(data, str) and "\n" not in data and len(data) < 4096 and Path(data).expanduser().is_file():
            hint = f"; a str is the text itself: to read the file {data}, pass pathlib.Path({data!r})"
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than nsamples x seqlen = "
                         f"{nsamples} x {seqlen} = {need}: give more text, or fewer or shorter segments{hint}")
    return sample_segments(ids, nsamples, seqlen, seed)


def refuse_text(calibration: object) -> None:
    """Refuse text given where token ids are expected, naming :func:`calibration_tokens` (changes nothing)."""
    if isinstance(calibration, torch.Tensor):
        return
    if isinstance(calibration, str | os.PathLike | list | tuple) or hasattr(calibration, "column_names"):
        raise TypeError(f"calibrate takes token ids (LongTensor [nsamples, seqlen]), got a "
                        f"{type(calibration).__name__}: make them from raw text, a text file, a list of strings or "
                        "a dataset with pbs2p.calibration_tokens(data, tokenizer, nsamples, seqlen)")
