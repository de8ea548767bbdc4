"""Sequential onloading: compress a model folder from disk with one decoder block in memory at a time.

:class:`Checkpoint` names a transformers model folder (safetensors, one file or shards with an index)
and the folder to write. :func:`pbs2p.calibrate` then builds the model on the meta device (accelerate's
``init_empty_weights``: no weight is read), reads the modules before the first block to capture the
calibration inputs, and walks the blocks: each is read from the shards with safetensors' ``safe_open``
in the compute dtype onto the compute device, compressed, written out as its own shard (packed weights
flattened by torchao's ``flatten_tensor_state_dict``, as ``save_pretrained`` of a torchao-quantized
model writes them) and released. Embeddings, final norm and LM head are copied last. The result is a
normal sharded model folder that ``AutoModelForCausalLM.from_pretrained(out)`` reloads after
``import pbs2p``.

Nothing is written to ``out`` until the run has succeeded: the shards go to a temporary folder next to
it, which is renamed to ``out`` at the end and deleted on any failure. The source folder is only read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..interop import TENSOR_CHECKSUMS, tensor_digest
from ..quantize import check_finite
from ..tensor import BinarySparseTensor
from .blocks import named_state
from .families import decoder_blocks, is_conv1d

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Files of a model folder that are weights (not copied to the output).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".safetensors.index.json",
                   ".bin.index.json")


@dataclass(frozen=True)
class Checkpoint:
    """A model folder compressed from disk by :func:`pbs2p.calibrate`, block by block, into ``out``.

    Args:
        path: a transformers causal-LM folder with safetensors weights (``model.safetensors`` or shards
            and ``model.safetensors.index.json``).
        out: the folder to write (must not exist, or be empty); ``from_pretrained(out)`` reloads it.
        dtype: the compute dtype, also that of the written scales, norms and embeddings (default: the
            checkpoint's ``dtype`` in its config, else float32).

    Example:
        >>> import tempfile, torch
        >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        >>> from pbs2p import PBS2P, Checkpoint, calibrate
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/compressed"
        >>> LlamaForCausalLM(cfg).save_pretrained(src)
        >>> result = calibrate(Checkpoint(src, out), torch.randint(0, 128, (4, 16)), PBS2P(n=4, m=8),
        ...                    progress=False)
        >>> result.folder.name, len(result.report.converted)
        ('compressed', 14)
        >>> type(AutoModelForCausalLM.from_pretrained(out).model.layers[1].mlp.up_proj.weight).__name__
        'BinarySparseTensor'
    """

    path: str | os.PathLike
    out: str | os.PathLike
    dtype: torch.dtype | None = None


class CheckpointBlocks:
    """The :class:`~pbs2p.pipeline.blocks.BlockSource` of a :class:`Checkpoint` (see the module's docstring).

    ``writer``: whether this process writes the output (rank 0 of a distributed run; the others only read).
    """

    restores_in_place = False

    def __init__(self, spec: Checkpoint, device: torch.device | str | None = None, writer: bool = True) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.src, self.out = Path(spec.path), Path(spec.out)
        if not (self.src / "config.json").is_file():
            raise ValueError(f"{self.src} is not a transformers model folder (no config.json)")
        self.files = weight_map(self.src)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise FileExistsError(f"{self.out} already exists and is not an empty folder; choose a new output "
                                  "folder (or delete this one)")
        if self.out.resolve() == self.src.resolve():
            raise ValueError("the output folder must differ from the checkpoint folder")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.input_device = self.device
        config = AutoConfig.from_pretrained(self.src)
        self.dtype = spec.dtype or _config_dtype(config)
        if not self.dtype.is_floating_point:
            raise ValueError(f"the compute dtype must be a floating-point dtype, got {self.dtype}")
        with self.device, init_empty_weights(include_buffers=False):  # buffers computed at init: on the device
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.tie_weights()  # as from_pretrained does (tied weights are stored once)
        self.model.eval()
        self.blocks = decoder_blocks(self.model)
        if any(is_conv1d(m) for m in self.blocks.modules()):
            raise ValueError(f"{type(self.model).__name__} stores its linears as Conv1D, which the on-disk path does "
                             "not convert; load the model with from_pretrained and pass it to calibrate instead")
        for name, buffer in self.model.named_buffers():  # computed at init (rotary frequencies): to the device
            if buffer.device.type != "meta":
                _set(self.model, name, self.device, buffer, None)
        path = next(name for name, mod in self.model.named_modules() if mod is self.blocks)
        self.blocks_path = path
        self.prefixes = [f"{path}.{i}." for i in range(len(self.blocks))]
        state = list(self.model.state_dict(keep_vars=True).items())
        self.tensor_names = [name for name, _ in state]
        seen: set[int] = set()
        self.unique = []  # state-dict names without tied duplicates (what is stored)
        for name, tensor in state:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                self.unique.append(name)
        missing = [n for n in self.unique if n not in self.files]
        if missing:
            raise ValueError(f"{self.src} lacks {len(missing)} tensor(s) this {type(self.model).__name__} expects "
                             f"(e.g. {missing[:3]}); its names differ from this transformers version's. Load it "
                             "with from_pretrained and pass the model to calibrate instead")
        self.outside = [n for n in self.unique if not n.startswith(path + ".")]
        self.writer = writer
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=_parent(self.out))) if writer \
            else None
        self.written: dict[str, str] = {}  # flattened tensor name -> shard file
        self.total_size = 0

    # ------------------------------------------------------------------ reading
    def _read(self, names: list[str], strip: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """``(name without strip, tensor)`` for checkpoint tensors ``names``, one shard open at a time."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        read_on = str(self.device) if self.device.type in ("cpu", "cuda") else "cpu"
        for file, keys in by_file.items():
            with safe_open(self.src / file, framework="pt", device=read_on) as f:
                for key in keys:
                    yield key[len(strip):], f.get_tensor(key)

    def _materialise(self, module: torch.nn.Module, names: list[str], strip: str = "") -> None:
        for name, tensor in self._read(names, strip):
            _set(module, name, self.device, tensor, self.dtype)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """The modules outside the blocks, except an untied LM head, on the device while inputs are captured."""
        head = self.model.get_output_embeddings()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        embed_ids = {id(p) for p in self.model.get_input_embeddings().parameters()}
        state = self.model.state_dict(keep_vars=True)
        names = [n for n in self.outside if id(state[n]) not in head_ids - embed_ids]
        self._materialise(self.model, names)
        try:
            yield
        finally:
            for name in names:
                _set(self.model, name, "meta", None, None)

    def open(self, i: int) -> torch.nn.Module:
        block, prefix = self.blocks[i], self.prefixes[i]
        self._materialise(block, [prefix + name for name, _, _ in named_state(block)], strip=prefix)
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.dtype.is_floating_point:
                check_finite(f"block {i}: {name}", mod.weight, unchanged="nothing was written")
        return block

    # ------------------------------------------------------------------ writing
    def close(self, i: int, block: torch.nn.Module, done: bool) -> None:
        """Write block ``i`` (``done``: it was compressed) and release its tensors (back to the meta device)."""
        if done and self.writer:
            state = {self.prefixes[i] + name: getattr(mod, attr).detach() for name, mod, attr in named_state(block)}
            self._write(state, f"block {i}", i + 1)
        for _, mod, attr in named_state(block):
            value = getattr(mod, attr)
            if isinstance(value, BinarySparseTensor):  # kept as a shape-only record for the conversion report
                mod._parameters[attr] = torch.nn.Parameter(value.detach().to("meta"), requires_grad=False)
            else:
                _set(mod, attr, "meta", None, None)

    def _write(self, state: dict[str, torch.Tensor], what: str, number: int, extra: dict[str, str] | None = None
               ) -> None:
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict({k: v.to("cpu") for k, v in state.items()})
        metadata.update(extra or {})
        metadata["tensor_names"] = json.dumps(self.tensor_names)  # every shard lists them all, as save_pretrained
        metadata["format"] = "pt"
        file = f"model-{number:05d}-of-{len(self.blocks) + 1:05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        metadata[TENSOR_CHECKSUMS] = json.dumps({k: tensor_digest(v) for k, v in tensors.items()}, sort_keys=True)
        try:
            save_file(tensors, self.tmp / file, metadata=metadata)
        except OSError as exc:
            raise OSError(f"could not write {what} to {self.tmp / file}: {exc}") from exc
        self.written.update(dict.fromkeys(tensors, file))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        """Write the modules outside the blocks, the index, the config and the other files; rename to ``out``."""
        if not self.writer:
            return
        outside = {name: tensor for name, tensor in self._read(self.outside)}
        outside = {k: v.to(self.dtype) if v.dtype.is_floating_point else v for k, v in outside.items()}
        tied = {n: json.dumps({"_type": "Tensor"}) for n in self.tensor_names  # stored under another name
                if not n.startswith(self.blocks_path + ".") and n not in outside}
        self._write(outside, "the modules outside the blocks", len(self.blocks) + 1, tied)
        del outside
        index = {"metadata": {"total_size": self.total_size, "total_parameters": self.model.num_parameters()},
                 "weight_map": dict(sorted(self.written.items()))}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self.model.config.dtype = self.dtype
        self.model.config.save_pretrained(self.tmp)
        for item in sorted(self.src.iterdir()):
            if item.is_file() and item.name != "config.json" and not item.name.startswith("pbs2p_") \
                    and not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(item, self.tmp / item.name)
        self.tmp.chmod(0o755)
        if self.out.exists():
            self.out.rmdir()  # empty (checked at the start)
        os.replace(self.tmp, self.out)
        self.tmp = None

    def discard(self) -> None:
        """Delete what was written (a failed or interrupted run leaves no output)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file (relative to ``folder``) of a model folder."""
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        return dict(json.loads((folder / INDEX).read_text())["weight_map"])
    if (folder / SINGLE).is_file():
        with safe_open(folder / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)  # noqa: SIM118 (safe_open is not a dict)
    raise ValueError(f"{folder} has no safetensors weights ({SINGLE} or {INDEX}); save the model with "
                     "save_pretrained (safetensors) first")


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def _set(module: torch.nn.Module, name: str, device, value: torch.Tensor | None, dtype: torch.dtype | None) -> None:
    """accelerate's ``set_module_tensor_to_device`` (values cast to ``dtype`` if floating)."""
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)
