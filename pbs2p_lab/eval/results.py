"""Result records: what was measured, on what, with which software, written as JSON.

A result file holds shared context (model, text split, calibration, versions, command) and a list of
``entries``, one per evaluated model state (e.g. the FP model and its compressed version). Each entry::

    {"label", "method", "nm", "config", "bits_per_weight", "bits_per_weight_kept", "size_mb",
     "perplexity", "zeroshot", "per_layer", "wall_s"}

``bits_per_weight`` is honest: every stored bit of the compressed linears (signs, kept-set index, alpha,
mu) over their number of weights (for an uncompressed model: the bits of its dtype). ``bits_per_weight_kept``
is the convention of the paper's peers: 1 bit per kept weight and nothing else (N/M, averaged over the
linears when CFS gives blocks different N). ``size_mb`` is the whole model: every parameter and
persistent buffer at its stored size, tied ones once, in 10^6 bytes. ``per_layer`` lists each compressed linear with
``weight_rel_error`` ‖W − Ŵ‖/‖W‖ and, when calibrated, ``output_rel_error`` ‖(W − Ŵ)X‖/‖WX‖.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

__all__ = ["RESULT_SCHEMA", "model_size_bytes", "package_versions", "result_header", "write_result"]

RESULT_SCHEMA = "pbs2p-result-v1"
_PACKAGES = ("pbs2p", "torch", "torchao", "transformers", "lm-eval", "gguf", "mwparserfromhell", "numpy")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that determine the numbers, plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    packed = getattr(tensor, "packed_nbytes", None)  # BinarySparseTensor counts every stored byte
    if callable(packed):
        return int(packed())
    return tensor.numel() * tensor.element_size()


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (e.g. the int8 rows of ``pbs2p.int8_embeddings_``), tied or
    shared tensors counted once, packed weights at their packed size."""
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                seen.setdefault(id(buf), buf)
    return sum(_tensor_nbytes(t) for t in seen.values())


def result_header(command: str | None = None) -> dict:
    """The context shared by all result files: schema, time, host, versions, command line."""
    return {
        "schema": RESULT_SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(["pbs2p", *sys.argv[1:]]),
        "host": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": package_versions(),
    }


def write_result(path: str | os.PathLike[str], record: dict) -> Path:
    """Write ``record`` as indented JSON (creating folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return path
