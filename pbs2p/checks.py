"""Checks that refuse, before anything changes, a model and calibration tokens that compression cannot use.

Each raises ``ValueError`` (``TypeError`` for a wrong kind of argument) naming the cause and what to do,
instead of the error some library would raise halfway through (``NotImplementedError`` from an
already packed weight, ``Tensor.item()`` on the meta device, ``IndexError`` in the embedding).
"""

from __future__ import annotations

import torch

from .tensor import BinarySparseTensor

__all__ = ["check_calibration_model"]


def check_calibration_model(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """Refuse a model or calibration tokens that :func:`pbs2p.calibrate` cannot compress; change nothing.

    Refused: a model that already holds packed PBS²P weights, a model whose weights are on the meta
    device (no values), and token ids outside the model's vocabulary (negative, or not below the input
    embedding's size). ``tokens`` must be an integer tensor.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg)
        >>> check_calibration_model(model, torch.randint(0, 128, (2, 16)))
        >>> check_calibration_model(model, torch.tensor([[5, 300]]))
        Traceback (most recent call last):
        ...
        ValueError: calibration token id 300 is outside the model's vocabulary (its input embedding has 128 rows, \
ids 0..127): the tokens come from another tokenizer than this model's; tokenize the calibration text with the \
model's own tokenizer
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype.is_complex \
            or tokens.dtype == torch.bool:
        kind = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"calibration tokens must be an integer tensor of token ids, got {kind}")
    packed = [name for name, p in model.named_parameters() if isinstance(p, BinarySparseTensor)]
    if packed:
        raise ValueError(
            f"this model already holds {len(packed)} packed PBS2P weight(s) (e.g. {', '.join(packed[:3])}); "
            "calibrate compresses a float model. Load the original float checkpoint and calibrate that"
        )
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{len(meta)} weight(s) of this model are on the meta device, without values (e.g. {', '.join(meta[:3])}): "
            "it was built under torch.device('meta') or loaded without its weights. Load the real weights "
            "(from_pretrained without device_map='meta', or load_state_dict(..., assign=True)) before calibrating"
        )
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    if tokens.numel() and isinstance(vocab, int):
        low, high = int(tokens.min()), int(tokens.max())
        bad = high if high >= vocab else low if low < 0 else None
        if bad is not None:
            raise ValueError(
                f"calibration token id {bad} is outside the model's vocabulary (its input embedding has {vocab} "
                f"rows, ids 0..{vocab - 1}): the tokens come from another tokenizer than this model's; tokenize "
                "the calibration text with the model's own tokenizer"
            )
