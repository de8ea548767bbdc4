"""Compact embeddings (beyond the paper): a causal LM's token embedding and LM head as int8 rows.

PBS²P compresses the decoder's linears; the embedding matrix and the output head stay as they were. In
a small model they are most of the bytes read per generated token: SmolLM2-135M's tied 49,152 × 576
matrix is 113 MB in float32 against 20 MB for all its packed linears, and the head reads all of it for
every token. :func:`int8_embeddings_` stores each such matrix once as int8 with one float32 scale per
row (symmetric, round to nearest: ``q = round(w / s)``, ``s = max |w_row| / 127``), keeping tied matrices
tied (one int8 copy serves the lookup and the head). The head then runs ``pbs2p::int8_rows_linear``,
a native CPU product that reads each int8 row once and sums in float32.

This changes the model's outputs (by the rounding of the head's weights): it is an option, off unless
asked for, applied to a loaded model (it is not part of a saved folder; apply it again after loading).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.ops import int8_rows_linear


class Int8Rows(torch.nn.Module):
    """A matrix stored as int8 rows ``q`` and one float32 ``scale`` per row: ``W ≈ scale[:, None] * q``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.register_buffer("q", torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``W`` in float32."""
        return self.q[ids].float() * self.scale[ids].unsqueeze(-1)


class Int8Embedding(torch.nn.Module):
    """Token lookup in :class:`Int8Rows` (in place of an ``nn.Embedding``), returning ``dtype``."""

    def __init__(self, rows: Int8Rows, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        super().__init__()
        self.rows, self.dtype, self.padding_idx = rows, dtype, padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.rows.q.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.rows.q.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.rows(ids).to(self.dtype)


class Int8Head(torch.nn.Module):
    """The output head ``x @ W.T (+ bias)`` with ``W`` in :class:`Int8Rows` (in place of an ``nn.Linear``)."""

    def __init__(self, rows: Int8Rows, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.rows = rows
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.rows.q.shape[1]

    @property
    def out_features(self) -> int:
        return self.rows.q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_rows_linear(x, self.rows.q, self.rows.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)


@dataclass(frozen=True)
class EmbeddingsReport:
    """What :func:`int8_embeddings_` stored: whether the head and embedding share one matrix, and the bytes
    of the stored matrices before and after (int8 rows plus their float32 scales).

    Example:
        >>> from pbs2p import EmbeddingsReport
        >>> r = EmbeddingsReport(tied=True, bytes_before=113_246_208, bytes_after=28_508_160)
        >>> round(r.bytes_before / r.bytes_after, 2)
        3.97
    """

    tied: bool
    bytes_before: int
    bytes_after: int


def int8_embeddings_(model: torch.nn.Module) -> EmbeddingsReport:
    """Store a causal LM's input embedding and output head as int8 rows (see the module's docstring), in place.

    ``model`` needs ``get_input_embeddings`` / ``get_output_embeddings`` (any Hugging Face causal LM) returning
    an ``nn.Embedding`` and an ``nn.Linear``. A head that shares the embedding's weight keeps sharing it. The
    model is left unchanged when this raises (a missing or unsupported module, a non-finite weight).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        >>> from pbs2p import int8_embeddings_
        >>> model = LlamaForCausalLM(cfg)
        >>> report = int8_embeddings_(model)
        >>> report.tied, report.bytes_before, report.bytes_after  # 64 x 32 float32 -> int8 + 64 scales
        (True, 8192, 2304)
        >>> model(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 64])
    """
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        raise TypeError(f"int8_embeddings_ needs a model with get_input_embeddings/get_output_embeddings (a causal "
                        f"LM), got {type(model).__name__}; the model was left unchanged")
    emb, head = get_in(), get_out()
    if type(emb) is not torch.nn.Embedding:
        raise TypeError(f"int8_embeddings_: the input embedding is a {type(emb).__name__}, not a torch.nn.Embedding "
                        "(a model that scales or transforms its embeddings is not supported); the model was left "
                        "unchanged")
    if type(head) is not torch.nn.Linear:
        raise TypeError(f"int8_embeddings_: the output head is a {type(head).__name__}, not a torch.nn.Linear; the "
                        "model was left unchanged")
    tied = head.weight is emb.weight
    weights = [emb.weight] if tied else [emb.weight, head.weight]
    for w in weights:
        if not w.dtype.is_floating_point or not bool(torch.isfinite(w).all()):
            raise ValueError("int8_embeddings_: the embedding / head weight must be finite floating point; the model "
                             "was left unchanged")
    rows = [Int8Rows(w) for w in weights]
    before = sum(w.numel() * w.element_size() for w in weights)
    after = sum(r.q.numel() + r.scale.numel() * r.scale.element_size() for r in rows)
    new_emb = Int8Embedding(rows[0], emb.weight.dtype, emb.padding_idx)
    new_head = Int8Head(rows[0] if tied else rows[1], head.bias)
    model.set_input_embeddings(new_emb)
    model.set_output_embeddings(new_head)
    return EmbeddingsReport(tied=tied, bytes_before=before, bytes_after=after)
