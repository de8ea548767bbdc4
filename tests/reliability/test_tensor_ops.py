"""Every operation a packed weight supports in grad mode works, with the same result, under ``torch.no_grad()``
and ``torch.inference_mode()`` (where composite ops such as ``aten.to.dtype`` reach the subclass undecomposed);
user-side edits of the scales save and reload; odd slices print."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

import pbs2p
from pbs2p import PBS2P, BinarySparseTensor, compress_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")

X = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
BIAS = torch.randn(128, generator=torch.Generator().manual_seed(1))


def _module(w: torch.Tensor) -> torch.nn.Linear:
    module = torch.nn.Linear(64, 128)
    with torch.no_grad():
        module.bias.copy_(BIAS)
    module.weight = torch.nn.Parameter(w, requires_grad=False)
    return module


def _value(result: object) -> object:
    """Something comparable across modes: tensors as dense values, modules as their outputs, else the repr."""
    if isinstance(result, torch.nn.Module):
        with torch.no_grad():
            return _value(result(X.to(next(result.parameters()).dtype)))
    if isinstance(result, BinarySparseTensor):
        return ("packed", result.nm(), result.dtype, tuple(result.shape), result.dequantize(torch.float64))
    if isinstance(result, torch.Tensor):
        return ("dense", result.dtype, result.detach().clone())
    if isinstance(result, dict):
        return {k: _value(v) for k, v in result.items()}
    return repr(result)


#: name -> operation on a packed [128, 64] weight (each is what users do to weights and linears)
OPS: dict[str, Callable[[torch.Tensor], object]] = {
    "F.linear": lambda w: F.linear(X, w),
    "F.linear+bias": lambda w: F.linear(X, w, BIAS),
    "x @ w.t()": lambda w: X @ w.t(),
    "torch.matmul": lambda w: torch.matmul(X, w.t()),
    "torch.mm": lambda w: torch.mm(X, w.t()),
    "torch.addmm": lambda w: torch.addmm(BIAS, X, w.t()),
    "w.t()": lambda w: w.t(),
    "w.t().t()": lambda w: w.t().t(),
    "w.to(bf16)": lambda w: w.to(torch.bfloat16),
    "w.to(dtype=f16)": lambda w: w.to(dtype=torch.float16),
    "w.to(f32)": lambda w: w.to(torch.float32),
    "w.to(f32, copy=True)": lambda w: w.to(torch.float32, copy=True),
    "w.to('cpu')": lambda w: w.to("cpu"),
    "w.to('cpu', bf16)": lambda w: w.to("cpu", torch.bfloat16),
    "w.to(tensor)": lambda w: w.to(torch.zeros(1, dtype=torch.bfloat16)),
    "w.to(device=, dtype=)": lambda w: w.to(device="cpu", dtype=torch.float64),
    "w.bfloat16()": lambda w: w.bfloat16(),
    "w.half()": lambda w: w.half(),
    "w.float()": lambda w: w.float(),
    "w.double()": lambda w: w.double(),
    "w.cpu()": lambda w: w.cpu(),
    "w.type_as(tensor)": lambda w: w.type_as(torch.zeros(1, dtype=torch.bfloat16)),
    "w.detach()": lambda w: w.detach(),
    "w.clone()": lambda w: w.clone(),
    "w.contiguous()": lambda w: w.contiguous(),
    "torch.ops.aten.alias": lambda w: torch.ops.aten.alias.default(w),
    "w[0:64]": lambda w: w[0:64],
    "w[64:]": lambda w: w[64:],
    "w[10:30]": lambda w: w[10:30],
    "w[10:5]": lambda w: w[10:5],
    "w[-5:]": lambda w: w[-5:],
    "w.narrow(0, 0, 64)": lambda w: w.narrow(0, 0, 64),
    "w.narrow(0, 3, 70)": lambda w: w.narrow(0, 3, 70),
    "w.clone().copy_(w)": lambda w: w.clone().copy_(w),
    "copy.deepcopy(w)": lambda w: copy.deepcopy(w),
    "pickle round trip": lambda w: pickle.loads(pickle.dumps(w)),
    "w.dequantize()": lambda w: w.dequantize(),
    "w.dequantize(f64)": lambda w: w.dequantize(torch.float64),
    "w.unpack()": lambda w: w.unpack()[0].sum(),
    "repr(w)": lambda w: repr(w),
    "repr(w[10:5])": lambda w: repr(w[10:5]),
    "w.bits_per_weight()": lambda w: w.bits_per_weight(),
    "w.checksum": lambda w: w.checksum,
    "w.nm()": lambda w: w.nm(),
    "w.shape/dim/numel": lambda w: (tuple(w.shape), w.dim(), w.numel(), w.size(0)),
    "w.is_contiguous()": lambda w: w.is_contiguous(),
    "w.requires_grad_(False)": lambda w: w.requires_grad_(False),
    "nn.Parameter(w)": lambda w: torch.nn.Parameter(w, requires_grad=False),
    "module(x)": lambda w: _module(w)(X),
    "module.to(bf16)": lambda w: _module(w).to(torch.bfloat16),
    "module.half()": lambda w: _module(w).half(),
    "module.float()": lambda w: _module(w).float(),
    "module.double()": lambda w: _module(w).double(),
    "module.cpu()": lambda w: _module(w).cpu(),
    "module.to('cpu', f32)": lambda w: _module(w).to("cpu", torch.float32),
    "module.requires_grad_(False)": lambda w: _module(w).requires_grad_(False),
    "module.zero_grad()": lambda w: _module(w).zero_grad() or _module(w),
    "module.state_dict()": lambda w: _module(w).state_dict(),
    "module.load_state_dict(own)": lambda w: (lambda mod: mod.load_state_dict(mod.state_dict()) and mod)(_module(w)),
    "copy.deepcopy(module)": lambda w: copy.deepcopy(_module(w)),
    "torch.save / torch.load": lambda w: _save_load(w),
}


def _save_load(w: torch.Tensor) -> torch.Tensor:
    import io

    buffer = io.BytesIO()
    torch.save({"w": w}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["w"]


MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.fixture(scope="module")
def packed() -> BinarySparseTensor:
    return compress_weight(torch.randn(128, 64, generator=torch.Generator().manual_seed(2)), PBS2P(n=4, m=8))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", list(OPS))
def test_op_works_in_every_grad_mode(packed, op, mode):
    expected = _value(OPS[op](copy.deepcopy(packed)))  # grad mode: the reference behaviour
    with MODES[mode]():
        got = _value(OPS[op](copy.deepcopy(packed)))
    assert _same(got, expected), op


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("mode", list(MODES))
def test_a_converted_model_changes_dtype_inside_the_mode(mode):
    # model.to(torch.bfloat16) inside inference_mode raised NotImplementedError for aten.to.dtype
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    outside = copy.deepcopy(model).to(torch.bfloat16)
    with MODES[mode]():
        model.to(torch.bfloat16)
        logits = model(ids).logits
    assert all(w.dtype == torch.bfloat16 for w in model.parameters())
    with torch.no_grad():
        assert torch.equal(logits, outside(ids).logits)


def test_empty_slice_prints_and_counts():
    w = compress_weight(torch.randn(128, 64), PBS2P(n=4, m=8))
    empty = w[10:5]
    assert tuple(empty.shape) == (0, 64)
    assert "n/a (empty)" in repr(empty)  # was ZeroDivisionError
    assert empty.bits_per_weight() != empty.bits_per_weight()  # nan
    assert F.linear(X, empty).shape == (3, 0)


EDIT_AND_SAVE = """
import torch, pbs2p
from transformers import AutoModelForCausalLM
expected = torch.load("edited.pt", weights_only=True)
model = AutoModelForCausalLM.from_pretrained("{folder}")
w = model.model.layers[0].self_attn.q_proj.weight
assert torch.equal(w.scale, expected["scale"]) and torch.equal(w.zero_point, expected["zero_point"])
print("ok")
"""


@pytest.mark.parametrize("origin", ["compressed", "loaded", "loaded-same-folder"])
def test_edited_scales_save_and_reload(tmp_path, origin):
    # user-side tuning edits alpha/mu in place; save_pretrained must write the new values with a new checksum
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8))
    folder = tmp_path / "first"
    if origin != "compressed":
        model.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
    w = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w.scale.mul_(1.25)
        w.zero_point.add_(0.01)
    torch.save({"scale": w.scale.clone(), "zero_point": w.zero_point.clone()}, tmp_path / "edited.pt")
    target = folder if origin == "loaded-same-folder" else tmp_path / "second"
    model.save_pretrained(target)
    script = "import os\nos.environ.setdefault('TORCHAO_FORCE_SKIP_LOADING_SO_FILES', '1')\n"
    script += textwrap.dedent(EDIT_AND_SAVE.format(folder=target))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
