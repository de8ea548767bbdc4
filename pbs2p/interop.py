"""Registrations that let torch, torchao and transformers load what pbs2p writes — and refuse damage.

Each of these libraries refuses to rebuild classes it does not know, on purpose (a checkpoint must
not run arbitrary code). They keep allowlists, and :func:`register` adds pbs2p's two classes to them,
once, at ``import pbs2p``:

* ``torch.load(..., weights_only=True)``: :class:`BinarySparseTensor` and :class:`PBS2P` as safe globals;
* torchao's safetensors support (used by transformers' ``save_pretrained``/``from_pretrained``):
  the tensor class by name in ``ALLOWED_TENSORS_SUBCLASSES`` / ``ALLOWED_CLASSES``;
* torchao's ``config_from_dict`` (used by transformers' ``TorchAoConfig``): the module ``pbs2p``
  in ``ALLOWED_AO_MODULES``.

transformers gathers a weight's inner tensors by the torchao names ``qdata``/``scale``/``zero_point``,
which is why :class:`BinarySparseTensor` uses them. But when a checkpoint lacks a weight, transformers
initializes it at random and only logs it; for a compressed model that is never right. So
:func:`register` also hooks transformers' loader, and ``from_pretrained`` refuses (``ValueError`` naming
the tensors; the files are only read):

* safetensors files holding packed PBS²P weights while ``config.json`` has no PBS²P
  ``quantization_config`` (without one, transformers loads a plain model and initializes every packed
  linear at random): checked from the files' headers before any weight is read;
* for a PBS²P checkpoint, any parameter the files do not provide (a removed weight, a missing
  ``embed_tokens``, ``num_hidden_layers`` raised in the config), any tensor of the files the model
  has no place for, and any shape mismatch;
* any tensor of the files (packed or not: embeddings, norms, the LM head) whose bytes do not match the
  digest that ``save_pretrained`` recorded for it in the file's metadata (``pbs2p_tensor_checksums``,
  written for every file of a PBS²P model), and files without that record;
* then :func:`verify_loaded`: a packed weight listed in the metadata but not loaded, a weight without its
  checksum in the metadata (the integrity check cannot be switched off by deleting it), a packed weight
  of another shape or orientation than its linear, and packed weights whose ``N:M`` the config's
  :class:`PBS2P` does not describe (``m`` must match; the kept fraction must be ``n / m``, which CFS's
  per-block N keeps).

Two more hooks make transformers' own calls do what a user expects of them:

* ``save_pretrained`` of a model that ``torchao.quantization.quantize_`` converted with :class:`PBS2P`
  (which, unlike :func:`pbs2p.quantize_`, cannot mark the model: torchao hands it one module at a time)
  marks it first, from the config each converted linear records (:func:`prepare_to_save`), or refuses
  before writing anything when one ``quantization_config`` cannot describe the model
  (:func:`packed_configs`);
* ``from_pretrained(folder, dtype=...)`` gives the packed weights that dtype too (their scales are stored
  in the dtype the model was saved in, and transformers casts only the plain weights).

``tests/library/test_interop.py`` fails loudly if a new torchao or transformers release moves any of this.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable

import torch
from torchao.core import config as ao_config
from torchao.prototype.safetensors import safetensors_utils

from .config import PBS2P
from .tensor import BinarySparseTensor

#: attribute of a linear converted by torchao's ``quantize_``: the :class:`PBS2P` used (for ``save_pretrained``)
RECORDED_CONFIG = "_pbs2p_config"
REFUSAL = "refusing this pbs2p checkpoint, it is damaged or incomplete"
#: safetensors metadata key: ``{tensor name: digest}`` of every tensor of the file, written by ``save_pretrained``
TENSOR_CHECKSUMS = "pbs2p_tensor_checksums"
_PENDING = "computed when the file is written"


def tensor_digest(tensor: torch.Tensor) -> str:
    """A 128-bit BLAKE2b digest of a tensor as safetensors stores it (dtype, shape, bytes).

    >>> tensor_digest(torch.zeros(2)) == tensor_digest(torch.zeros(2)), tensor_digest(torch.zeros(2)) == tensor_digest(
    ...     torch.zeros(3))
    (True, False)
    """
    digest = hashlib.blake2b(f"{tensor.dtype}:{tuple(tensor.shape)}".encode(), digest_size=16)
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _refuse(problems: list[str], advice: str = "") -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{REFUSAL}: {shown}{'. ' + advice if advice else ''}")


def packed_entries(metadata: dict[str, str] | None) -> dict[str, dict]:
    """The metadata entries (torchao's safetensors format) of every :class:`BinarySparseTensor`, by parameter name.

    >>> packed_entries({"a.weight": '{"_type": "BinarySparseTensor", "_data": {"n": 4}}', "b": '{"_type": "Tensor"}'})
    {'a.weight': {'_type': 'BinarySparseTensor', '_data': {'n': 4}}}
    """
    entries = {}
    for key, value in (metadata or {}).items():
        try:
            entry = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict) and entry.get("_type") == BinarySparseTensor.__name__:
            entries[key] = entry
    return entries


def verify_loaded(model: torch.nn.Module, metadata: dict[str, str] | None = None, config: PBS2P | None = None) -> None:
    """Raise ``ValueError`` unless every packed weight of ``model`` is present, intact and described by ``config``.

    ``metadata`` is the safetensors metadata of the checkpoint (torchao's format): every tensor it lists
    as a :class:`BinarySparseTensor` must have been loaded as one, and must carry its checksum (which the
    load verified). ``config`` is the checkpoint's :class:`PBS2P` (``config.json``): every packed weight
    has its ``m``, and together they keep ``n / m`` of their weights (CFS varies ``n`` per block, not the mean).

    Example:
        >>> import torch
        >>> from pbs2p import PBS2P, quantize_
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> _ = quantize_(model, PBS2P(n=4, m=8))
        >>> verify_loaded(model, config=PBS2P(n=4, m=8))
        >>> verify_loaded(model, config=PBS2P(n=2, m=4))
        Traceback (most recent call last):
        ...
        ValueError: refusing this pbs2p checkpoint, it is damaged or incomplete: 0.weight is 4:8, but the checkpoint's \
quantization_config says 2:4 (config.json was edited, or belongs to another checkpoint). Restore the config.json \
written with these weights
    """
    problems = []
    packed: dict[str, BinarySparseTensor] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, BinarySparseTensor):
            packed[f"{name}.weight" if name else "weight"] = weight
            expected = (module.out_features, module.in_features)
            if tuple(weight.shape) != expected:
                problems.append(f"{name}.weight is {tuple(weight.shape)}, the model expects {expected}")
            elif weight.transposed:
                problems.append(f"{name}.weight is stored transposed; a linear's weight is [out, in]")
    for key, entry in packed_entries(metadata).items():
        try:
            loaded = model.get_parameter(key)
        except AttributeError:
            loaded = None
        if not isinstance(loaded, BinarySparseTensor):
            problems.append(f"{key} is packed in the checkpoint but was not loaded (missing or damaged tensors)")
        if not (entry.get("_data") or {}).get("checksum"):
            problems.append(f"{key} has no checksum in the checkpoint's metadata (written by another tool, or edited)")
    if config is not None and packed:
        other_m = [f"{key} is {w.n}:{w.m}" for key, w in packed.items() if w.m != config.m]
        kept = sum(w.numel() * w.n for w in packed.values())
        if other_m:
            problems.append(f"{other_m[0]}, but the checkpoint's quantization_config says {config.n}:{config.m} "
                            "(config.json was edited, or belongs to another checkpoint)")
        elif kept != config.n * sum(w.numel() for w in packed.values()):
            mean = kept / sum(w.numel() for w in packed.values())
            problems.append(f"the packed weights keep {mean:.3f} of every {config.m} weights on average, but the "
                            f"checkpoint's quantization_config says {config.n}:{config.m} (config.json was edited, "
                            "or belongs to another checkpoint)")
    _refuse(problems, "Restore the config.json written with these weights" if config is not None and problems and
            all("quantization_config" in p for p in problems) else "")


def _loading_problems(loading_info) -> list[str]:  # noqa: ANN001 (transformers' LoadStateDictInfo)
    """What a load report says is wrong: any of it means weights initialized at random or dropped."""
    problems = [f"{key} is not in the checkpoint (transformers would initialize it at random)"
                for key in sorted(loading_info.missing_keys)]
    problems += [f"{key} has shape {tuple(got)} in the checkpoint, the model expects {tuple(want)}"
                 for key, got, want in sorted(loading_info.mismatched_keys, key=str)]
    problems += [f"the checkpoint holds {key}, which this model has no place for (does config.json match the "
                 "weights, e.g. num_hidden_layers?)" for key in sorted(loading_info.unexpected_keys)]
    for key, error in sorted(getattr(loading_info, "conversion_errors", {}).items()):
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        problems.append(f"{key} could not be rebuilt ({lines[-1] if lines else 'conversion failed'})")
    return problems


def read_safetensors_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, str], list[str]] | None:
    """The ``__metadata__`` and tensor names of a safetensors file, from its header only (``None`` if unreadable).

    >>> read_safetensors_metadata("/nonexistent.safetensors") is None
    True
    """
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100 * 2**20:
                return None
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", None) or {}
    return (metadata if isinstance(metadata, dict) else {}), list(header)


def _is_pbs2p(quantizer) -> bool:  # noqa: ANN001
    return isinstance(getattr(getattr(quantizer, "quantization_config", None), "quant_type", None), PBS2P)


def metadata_problems(metadata: dict[str, str], name: str, stored: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the structure of a file's torchao metadata (empty if nothing): ``tensor_names`` must
    be a JSON list of names, each with a JSON entry that says its ``_type`` (with ``stored``, the tensors the
    file holds, only the names stored in this file need one: a shard written block by block describes its own).

    >>> metadata_problems({"tensor_names": '["a.weight", ["x"]]', "a.weight": '{"_type": "Tensor"}'}, "f")
    ["f: the metadata's tensor_names lists ['x'], not a tensor name"]
    """
    try:
        names = json.loads(metadata.get("tensor_names") or "null")
    except ValueError:
        names = None
    if not isinstance(names, list):
        return [f"{name}: the metadata's tensor_names is not a JSON list"]
    problems = []
    held = None if stored is None else set(stored)
    for key in names:
        if not isinstance(key, str):
            problems.append(f"{name}: the metadata's tensor_names lists {key!r}, not a tensor name")
            continue
        module, _, attr = key.rpartition(".")
        if held is not None and key not in metadata and key not in held and not any(
                h.startswith(f"{module}._{attr}_") for h in held):
            continue
        try:
            entry = json.loads(metadata.get(key) or "null")
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("_type"), str):
            problems.append(f"{key} (in {name}) has no valid metadata entry")
        elif entry["_type"] not in ("Tensor", BinarySparseTensor.__name__):
            problems.append(f"{key} (in {name}) has metadata of type {entry['_type']!r}, not Tensor or "
                            f"{BinarySparseTensor.__name__}")
        elif entry["_type"] == BinarySparseTensor.__name__ and not (
                isinstance(entry.get("_data"), dict) and isinstance(entry.get("_tensor_data_names"), list)):
            problems.append(f"{key} (in {name}) has a damaged metadata entry (no _data or _tensor_data_names)")
    return problems


def merged_metadata_problems(metadatas: Iterable[dict[str, str]]) -> list[str]:
    """What is wrong with the metadata of a checkpoint's files taken together (empty if nothing), as transformers'
    torchao loader reads it: one dict (a later file's keys over an earlier one's), which needs an entry for
    every name its ``tensor_names`` lists. Without this check such files fail deep in transformers with
    "Invalid torchao safetensors metadata", naming nothing.

    >>> merged_metadata_problems([{"tensor_names": '["a.weight", "b.weigjt"]', "a.weight": '{"_type": "Tensor"}'}])
    ["b.weigjt is listed in the metadata's tensor_names, but no file's metadata describes it (edited or damaged)"]
    """
    merged: dict[str, str] = {}
    for metadata in metadatas:
        merged.update(metadata)
    try:
        names = json.loads(merged.get("tensor_names") or "null")
    except ValueError:
        names = None
    if not isinstance(names, list):
        return []  # (the files' own checks say what is wrong with it)
    return [f"{key} is listed in the metadata's tensor_names, but no file's metadata describes it (edited or "
            "damaged)" for key in names if isinstance(key, str) and key not in merged]


def verify_tensor_checksums(path: str | os.PathLike[str]) -> list[str]:
    """What is wrong with the tensors of one safetensors file of a PBS²P checkpoint (empty if nothing).

    Every tensor must be listed in the file's ``pbs2p_tensor_checksums`` and have that digest (a changed
    embedding would otherwise load without a word: safetensors and transformers check no content).
    """
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            try:
                recorded = json.loads(metadata.get(TENSOR_CHECKSUMS) or "null")
            except ValueError:
                recorded = None
            if not isinstance(recorded, dict):
                return [f"{name} has no valid {TENSOR_CHECKSUMS} in its metadata (written by another tool, by an "
                        "older pbs2p, or edited)"]
            problems = []
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if key not in recorded:
                    problems.append(f"{key} (in {name}) has no recorded checksum (added or renamed after saving)")
                elif tensor_digest(f.get_tensor(key)) != recorded[key]:
                    problems.append(f"{key} (in {name}) does not match its checksum (recorded when saved; damaged "
                                    "or edited)")
            return problems
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        return [f"{name} cannot be read as safetensors ({type(exc).__name__}: {str(exc)[:200]}); truncated or damaged"]


def check_checkpoint_files(checkpoint_files: Iterable[str] | None, quantizer) -> None:  # noqa: ANN001
    """Refuse safetensors files whose packed PBS²P weights the model's config would not load as such.

    Without a PBS²P ``quantization_config`` in ``config.json``, transformers builds plain linears and
    initializes each packed one at random (their flattened tensors are merely "unexpected"). With one,
    the files must carry torchao's metadata, which is what describes the packed weights, and every
    tensor must match its recorded digest (:func:`verify_tensor_checksums`). Reads the headers only, and
    the tensors of a PBS²P checkpoint.
    """
    files = [str(p) for p in checkpoint_files or () if str(p).endswith(".safetensors")]
    found: list[str] = []
    described = False
    for path in files:
        header = read_safetensors_metadata(path)
        if header is None:
            continue
        metadata, names = header
        entries = list(packed_entries(metadata))
        described |= bool(entries)
        # without metadata too: torchao's flattened names of a packed weight ("<module>._weight_qdata")
        entries += [name.replace("._weight_qdata", ".weight") for name in names if name.endswith("._weight_qdata")]
        found += [f"{name} (in {os.path.basename(path)})" for name in sorted(set(entries))]
    if _is_pbs2p(quantizer):
        if not files or not getattr(quantizer, "pre_quantized", False):
            return
        unreadable = [os.path.basename(f) for f in files if read_safetensors_metadata(f) is None]
        if unreadable:
            _refuse([f"{name} cannot be read as safetensors (its header is truncated or damaged)"
                     for name in unreadable], "Use the files that save_pretrained wrote")
        if not described:
            raise ValueError(
                f"{REFUSAL}: config.json says the weights are packed PBS2P, but the metadata of "
                f"{', '.join(os.path.basename(f) for f in files)} describes no packed weight"
                + (f" (the files hold {found[0].split(' ')[0]}, ...)" if found else "")
                + ": the safetensors metadata was stripped or the files were replaced. Use the files that "
                "save_pretrained wrote"
            )
        problems = []
        headers = [read_safetensors_metadata(path) for path in files]
        for path, header in zip(files, headers, strict=True):
            problems += metadata_problems(header[0], os.path.basename(path), header[1]) if header else []
            problems += verify_tensor_checksums(path)
        named = {problem.split(" ", 1)[0] for problem in problems}
        problems += [problem for problem in merged_metadata_problems(header[0] for header in headers if header)
                     if problem.split(" ", 1)[0] not in named]
        _refuse(problems, "Use the files that save_pretrained wrote")
        return
    if found:
        config = getattr(quantizer, "quantization_config", None)
        says = "no quantization_config" if config is None else f"quantization_config {type(config).__name__}" + (
            f"({type(config.quant_type).__name__})" if hasattr(config, "quant_type") else "")
        raise ValueError(
            f"{REFUSAL}: the files hold {len(found)} packed PBS2P weight(s), e.g. {', '.join(found[:3])}, but "
            f"config.json has {says}, so transformers would initialize those linears at random. Restore the "
            "\"quantization_config\" entry that save_pretrained wrote into config.json (quant_method \"torchao\", "
            "quant_type PBS2P)"
        )


def mark_hf_quantized(model: torch.nn.Module, config: PBS2P) -> None:
    """Let a transformers model compressed in place be saved with ``save_pretrained``.

    transformers writes torchao tensors (safetensors with torchao's metadata) only for a model that
    carries a torchao quantizer, which ``from_pretrained(..., quantization_config=TorchAoConfig(...))``
    attaches; a model compressed by :func:`pbs2p.quantize_` or :func:`pbs2p.calibrate` gets the same
    here. ``config.json`` then records the :class:`PBS2P` used, and ``from_pretrained`` reloads the
    packed weights as they are. Models that are not transformers models are left alone.
    """
    from transformers import PreTrainedModel, TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if not isinstance(model, PreTrainedModel):
        return
    quantization_config = TorchAoConfig(quant_type=config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = TorchAoHfQuantizer(quantization_config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = quantization_config.quant_method


def packed_configs(model: torch.nn.Module) -> PBS2P:
    """The one :class:`PBS2P` that made every packed weight of ``model`` (recorded by torchao's ``quantize_``).

    ``save_pretrained`` records the model's quantization in ``config.json``; a model converted by
    ``torchao.quantization.quantize_`` carries no record of it but each converted linear's, so this checks
    that they describe one config, and that nothing but PBS²P weights needs recording. ``ValueError``
    naming the weights otherwise (nothing is written).

    Example:
        >>> import torch
        >>> from torchao.quantization import quantize_
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        >>> quantize_(model, PBS2P(n=4, m=8), filter_fn=lambda module, name: name == "0")
        >>> packed_configs(model) == PBS2P(n=4, m=8)
        True
        >>> from pbs2p import compress_weight
        >>> model[0].weight = torch.nn.Parameter(compress_weight(torch.randn(64, 64), PBS2P(n=2, m=4)), False)
        >>> packed_configs(model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cannot record ... 0.weight holds a BinarySparseTensor that no PBS2P conversion recorded ...
    """
    from torchao.utils import TorchAOBaseTensor

    configs: dict[str, PBS2P | None] = {}
    others = []
    for key, param in model.named_parameters():
        if isinstance(param, BinarySparseTensor):
            config = getattr(model.get_submodule(key.rpartition(".")[0]), RECORDED_CONFIG, None)
            configs[key] = config if config is not None and (config.n, config.m) == param.nm() else None
        elif isinstance(param, TorchAOBaseTensor):
            others.append(f"{key} ({type(param).__name__})")
    problems = [f"{key} holds a BinarySparseTensor that no PBS2P conversion recorded (assigned by hand?); call "
                "pbs2p.interop.mark_hf_quantized(model, config) with the PBS2P that made it" for key, config in
                configs.items() if config is None][:1]
    distinct: dict[str, str] = {}
    for key, config in configs.items():
        if config is not None:
            distinct.setdefault(repr(config), key)
    if len(distinct) > 1:
        shown = "; ".join(f"{key}: {config}" for config, key in list(distinct.items())[:2])
        problems.append(f"the packed weights were made with {len(distinct)} different PBS2P configs ({shown}), and "
                        "config.json records one: convert the whole model with one PBS2P")
    if others:
        problems.append(f"the model also holds other torchao tensors ({', '.join(others[:3])}), and config.json "
                        "records one config: mix configs at load time with from_pretrained(..., "
                        "quantization_config=TorchAoConfig(quant_type=FqnToConfig({...})))")
    if problems or not configs:
        raise ValueError("cannot record how this model was quantized, so save_pretrained would not write a loadable "
                         f"checkpoint: {'; '.join(problems) or 'it holds no packed PBS2P weight'}. Nothing was "
                         "written")
    return next(config for config in configs.values() if config is not None)


def prepare_to_save(model: torch.nn.Module) -> None:
    """Before ``save_pretrained``: mark a transformers model that ``torchao.quantization.quantize_`` converted with
    :class:`PBS2P` as torchao-quantized, like :func:`pbs2p.quantize_` does (see :func:`mark_hf_quantized`).

    Models with a quantizer (loaded with one, or marked already) and models without packed weights are left alone.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        return
    if any(isinstance(param, BinarySparseTensor) for param in model.parameters()):
        mark_hf_quantized(model, packed_configs(model))


def _pbs2p_for(name: str, quant_type) -> PBS2P | None:  # noqa: ANN001 (a torchao config)
    """The :class:`PBS2P` that quantizing on load would apply to module ``name``'s weight (as transformers picks it)."""
    from torchao.quantization import FqnToConfig

    if not isinstance(quant_type, FqnToConfig):
        config = quant_type
    else:
        table, param = quant_type.fqn_to_config, f"{name}.weight"
        patterns = [c for key, c in table.items() if key.startswith("re:") and (
            re.fullmatch(key[3:], param) or re.fullmatch(key[3:], name))]
        config = table[param] if param in table else table[name] if name in table else (
            patterns[0] if patterns else table.get("_default"))
    return config if isinstance(config, PBS2P) else None


def refuse_non_linears_on_load(quantizer, model: torch.nn.Module) -> None:  # noqa: ANN001 (TorchAoHfQuantizer)
    """Refuse, before any weight is loaded, a ``TorchAoConfig`` that would hand PBS2P a module that is not an
    ``nn.Linear`` (an ``nn.Embedding`` through ``include_input_output_embeddings`` or ``FqnToConfig``): torchao's
    ``quantize_`` would skip it without a word, or refuse it in the middle of the load."""
    chosen = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if not isinstance(module, torch.nn.Linear) else None
        if weight is not None and quantizer.param_needs_quantization(model, f"{name}.weight") and _pbs2p_for(
                name, quantizer.quantization_config.quant_type) is not None:
            chosen.append(f"'{name}' ({type(module).__name__})")
    if chosen:
        raise ValueError(f"PBS2P converts nn.Linear weights only, but this TorchAoConfig selects {', '.join(chosen)} "
                         "for it (include_input_output_embeddings, or an FqnToConfig entry); leave them out. To "
                         "compress the LM head, pass modules_to_not_convert=[]")


def _cast_packed(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every packed weight of a loaded model the dtype it was loaded in (its scales are stored in the dtype the
    model was saved in; transformers casts the other weights only)."""
    for module in model.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, BinarySparseTensor) and param.dtype != dtype:
                setattr(module, key, torch.nn.Parameter(param.to(dtype), requires_grad=False))


def _drop_load_only_conversions(model: torch.nn.Module) -> None:
    """Forget the loader's torchao deserialization steps, which have no reverse: ``save_pretrained`` of a loaded
    model would fail on them (it flattens the packed weights itself)."""
    from transformers.integrations.torchao import TorchAoDeserialize

    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not any(
            isinstance(op, TorchAoDeserialize) for op in getattr(c, "operations", ()))]


def _patch_transformers_loader() -> None:
    from transformers import modeling_utils
    from transformers.modeling_utils import PreTrainedModel
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if not getattr(TorchAoHfQuantizer, "_pbs2p_verifies", False):
        original = TorchAoHfQuantizer._process_model_after_weight_loading

        def after_loading(self, model, **kwargs):
            model = original(self, model, **kwargs)
            if _is_pbs2p(self):
                if self.pre_quantized:
                    verify_loaded(model, getattr(self, "metadata", None), self.quantization_config.quant_type)
                    _drop_load_only_conversions(model)
                    dtype = getattr(model.config, "dtype", None)  # what from_pretrained(dtype=...) resolved to
                    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                        _cast_packed(model, dtype)
                else:
                    verify_loaded(model)
            return model

        TorchAoHfQuantizer._process_model_after_weight_loading = after_loading
        TorchAoHfQuantizer._pbs2p_verifies = True

    if not getattr(TorchAoHfQuantizer._process_model_before_weight_loading, "_pbs2p_checks", False):
        before_loading = TorchAoHfQuantizer._process_model_before_weight_loading

        def process_before_loading(self, model, checkpoint_files=None, **kwargs):
            # the files of a PBS2P checkpoint are checked here, before transformers reads their metadata
            if _is_pbs2p(self) and self.pre_quantized and checkpoint_files:
                check_checkpoint_files(checkpoint_files, self)
            model = before_loading(self, model, checkpoint_files=checkpoint_files, **kwargs) or model
            if not self.pre_quantized:
                refuse_non_linears_on_load(self, model)
            return model

        process_before_loading._pbs2p_checks = True
        TorchAoHfQuantizer._process_model_before_weight_loading = process_before_loading

    if not getattr(TorchAoHfQuantizer.get_state_dict_and_metadata, "_pbs2p_checks", False):
        state_dict_and_metadata = TorchAoHfQuantizer.get_state_dict_and_metadata

        def get_state_dict_and_metadata(self, model, *args, **kwargs):
            state_dict, metadata = state_dict_and_metadata(self, model, *args, **kwargs)
            if _is_pbs2p(self):
                metadata = {**metadata, TENSOR_CHECKSUMS: _PENDING}  # filled per file by safe_save_file
            return state_dict, metadata

        get_state_dict_and_metadata._pbs2p_checks = True
        TorchAoHfQuantizer.get_state_dict_and_metadata = get_state_dict_and_metadata

    if not getattr(modeling_utils.safe_save_file, "_pbs2p_checks", False):
        save_file = modeling_utils.safe_save_file

        def safe_save_file(tensors, filename, metadata=None, *args, **kwargs):
            if metadata and metadata.get(TENSOR_CHECKSUMS) == _PENDING:  # exactly the tensors of this file
                digests = {key: tensor_digest(value) for key, value in tensors.items()}
                metadata = {**metadata, TENSOR_CHECKSUMS: json.dumps(digests, sort_keys=True)}
            return save_file(tensors, filename, metadata, *args, **kwargs)

        safe_save_file._pbs2p_checks = True
        modeling_utils.safe_save_file = safe_save_file

    if not getattr(PreTrainedModel._load_pretrained_model, "_pbs2p_checks", False):
        load = PreTrainedModel._load_pretrained_model

        def load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
            quantizer = getattr(load_config, "hf_quantizer", None)
            if not _is_pbs2p(quantizer):  # (a PBS2P checkpoint's files were checked before its model was built)
                check_checkpoint_files(checkpoint_files, quantizer)
            return load(model, state_dict, checkpoint_files, load_config, *args, **kwargs)

        load_pretrained_model._pbs2p_checks = True
        PreTrainedModel._load_pretrained_model = staticmethod(load_pretrained_model)

    if not getattr(PreTrainedModel._finalize_model_loading, "_pbs2p_checks", False):
        finalize = PreTrainedModel._finalize_model_loading

        def finalize_model_loading(model, load_config, loading_info, *args, **kwargs):
            quantizer = getattr(load_config, "hf_quantizer", None)
            ours = _is_pbs2p(quantizer) and quantizer.pre_quantized
            try:
                loading_info = finalize(model, load_config, loading_info, *args, **kwargs)
            except RuntimeError as exc:  # transformers' generic "issues during automatic conversion"
                if ours:
                    _refuse(_loading_problems(loading_info), f"(transformers: {exc})")
                raise
            if ours:
                _refuse(_loading_problems(loading_info))
            return loading_info

        finalize_model_loading._pbs2p_checks = True
        PreTrainedModel._finalize_model_loading = staticmethod(finalize_model_loading)


    if not getattr(PreTrainedModel.save_pretrained, "_pbs2p_checks", False):
        save_pretrained = PreTrainedModel.save_pretrained

        @functools.wraps(save_pretrained)
        def save_pretrained_hook(self, *args, **kwargs):
            prepare_to_save(self)
            return save_pretrained(self, *args, **kwargs)

        save_pretrained_hook._pbs2p_checks = True
        PreTrainedModel.save_pretrained = save_pretrained_hook


def register() -> None:
    """Allowlist :class:`BinarySparseTensor` and :class:`PBS2P` for safe loading, hook the loader (idempotent)."""
    torch.serialization.add_safe_globals([BinarySparseTensor, PBS2P])
    name = BinarySparseTensor.__name__
    safetensors_utils.ALLOWED_CLASSES[name] = BinarySparseTensor
    if name not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
        safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append(name)
    ao_config.ALLOWED_AO_MODULES.add("pbs2p")
    _patch_transformers_loader()
