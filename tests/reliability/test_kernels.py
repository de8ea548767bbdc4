"""The compute on packed weights under adversarial inputs: the accuracy contract against the exact float64
product (where ``|mu|`` is close to ``alpha`` too), one NaN/Inf rule on every path, integer activations,
and the caches around the native operator (a truncated library, a stale compiled graph)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import fp64_contract_ratio, random_packed_weight
from hypothesis import given, settings
from hypothesis import strategies as st

from pbs2p import PBS2P, compress_weight
from pbs2p.kernels import native, ops, packing
from pbs2p.kernels.reference import reference_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
NM = [(2, 4), (4, 8), (5, 8), (6, 8), (1, 4), (3, 4), (3, 8), (7, 8), (8, 16), (3, 16)]


def native_isas() -> list[str]:
    return native.supported_isas() if HAS_COMPILER and native.load() else []


def weight(out: int, k: int, n: int, m: int, scale_block: int, mu_kind: str, seed: int,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return random_packed_weight(out, k, n, m, scale_block, dtype, seed, mu_kind)


def every_path(x, codes, alpha, mu, bias, n, m, scale_block, monkeypatch) -> dict[str, torch.Tensor]:
    """``ops.bsp_linear`` on the torch path, each native ISA, the BLAS path (float32: every ISA; bf16: AVX-512) and
    the pair kernels (bf16, where they apply)."""
    out = {}
    monkeypatch.setenv("PBS2P_KERNEL", "torch")
    out["torch"] = ops.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
    monkeypatch.setenv("PBS2P_KERNEL", "native")
    k, batch = x.shape[-1], x.numel() // x.shape[-1]
    for isa in native_isas():
        with native.use_isa(isa):
            out[isa] = ops.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
            monkeypatch.setenv("PBS2P_PAIR_MIN_BATCH", "1")
            if ops.native_path(x.dtype, batch, n, m, k, scale_block) == "pairs":
                out[f"{isa}-pairs"] = ops.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
            monkeypatch.setenv("PBS2P_PAIR_MIN_BATCH", str(2**62))
            if isa == "avx512" or x.dtype == torch.float32:
                monkeypatch.setenv("PBS2P_BLAS_MIN_BATCH", "1")
                out[f"{isa}-blas"] = ops.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
                monkeypatch.delenv("PBS2P_BLAS_MIN_BATCH")
            monkeypatch.delenv("PBS2P_PAIR_MIN_BATCH")
    monkeypatch.delenv("PBS2P_KERNEL")
    return out


# ------------------------------------------------------------------ accuracy against the exact product
EDGES = [(nm, mu_kind, dtype, scale_dtype, blocks_of)
         for nm in [(2, 4), (4, 8), (8, 16)] for mu_kind in ["near+", "near-", "big"]
         for dtype in [torch.float32, torch.bfloat16] for scale_dtype in [torch.float32, torch.bfloat16]
         for blocks_of in [0, 3]]


@pytest.mark.parametrize(("nm", "mu_kind", "dtype", "scale_dtype", "blocks_of"), EDGES)
def test_contract_holds_where_alpha_and_mu_cancel(nm, mu_kind, dtype, scale_dtype, blocks_of, monkeypatch):
    # |mu| within 0.1% of alpha: a kept weight is alpha * sign + mu ~ 0 for one sign. Rounding alpha and mu
    # to bf16 before adding them (the old torch path) was off by far more than the old bound allowed.
    n, m = nm
    k = 40 * m
    scale_block = k if blocks_of == 0 else blocks_of * m
    codes, alpha, mu = weight(150, k, n, m, scale_block, mu_kind, 7, scale_dtype)
    x = torch.randn(70, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(150).to(dtype)
    for path, y in every_path(x, codes, alpha, mu, bias, n, m, scale_block, monkeypatch).items():
        ratio = fp64_contract_ratio(y, x, codes, alpha, mu, bias, n, m, scale_block, ops.TOLERANCE[dtype])
        assert ratio <= 1.0, f"{path}: error {ratio:.3g} x the tolerance"


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (8, 16)])
def test_the_torch_path_keeps_small_weights_where_alpha_and_mu_cancel(nm, sign, monkeypatch):
    # Every kept weight is alpha * sign + mu with mu = -sign * alpha * (1 - d), d < 1e-3: W_hat ~ 1e-3 alpha.
    # The torch path (the reference, and the fallback) rounded alpha and mu to bf16 before adding them, which
    # turned such weights into 0 or +-2^-8 alpha; it computes W_hat in float32 and rounds it once, so its error
    # stays within the bf16 tolerance of |x| @ |W_hat|.T (not only of the contract's (|alpha| + |mu|) scale).
    n, m = nm
    out, k, scale_block = 48, 32 * m, 4 * m
    g = torch.Generator().manual_seed(n * m)
    top = torch.rand(out, k // m, m, generator=g).topk(n, -1).indices
    mask = torch.zeros(out, k // m, m, dtype=torch.bool).scatter_(-1, top, True).reshape(out, k)
    codes = packing.pack(mask, torch.full((out, k), sign > 0), n, m)
    alpha = torch.rand(out, k // scale_block, generator=g) + 0.5
    mu = -sign * alpha * (1 - 1e-3 * torch.rand(out, k // scale_block, generator=g))
    x = torch.randn(9, k, generator=g).to(torch.bfloat16)
    monkeypatch.setenv("PBS2P_KERNEL", "torch")
    y = ops.bsp_linear(x, codes, alpha, mu, None, n, m, scale_block).double()
    w_hat = packing.dequantize(codes, alpha.double(), mu.double(), n, m, scale_block, dtype=torch.float64)
    exact = x.double() @ w_hat.T
    ratio = ((y - exact).abs() / (ops.TOLERANCE[torch.bfloat16] * (x.double().abs() @ w_hat.abs().T))).max()
    assert ratio <= 1.0, f"error {float(ratio):.3g} x the bf16 tolerance of |x| @ |W_hat|.T"


def test_bf16_worst_case_rounding_is_within_the_contract(monkeypatch):
    # alpha and mu (fp32) just short of bf16 half-way points, every x positive: each bf16 rounding of the
    # paths is close to its largest (the BLAS path with fp32 scales rounds alpha, mu and W_hat, then y)
    g = torch.Generator().manual_seed(0)
    out, k = 4096, 8
    codes, _, _ = weight(out, k, 2, 4, k, "small", 0)
    near_half = 1 + 2**-8 * (1 - 1e-4 * torch.rand(out, 1, generator=g))
    alpha = (torch.rand(out, 1, generator=g) + 1).to(torch.bfloat16).float() * near_half
    mu = (torch.rand(out, 1, generator=g) + 1).to(torch.bfloat16).float() * near_half
    x = (torch.rand(1, k, generator=g) + 0.5).to(torch.bfloat16)
    for path, y in every_path(x, codes, alpha, mu, None, 2, 4, k, monkeypatch).items():
        ratio = fp64_contract_ratio(y, x, codes, alpha, mu, None, 2, 4, k, ops.TOLERANCE[torch.bfloat16])
        assert ratio <= 1.0, f"{path}: error {ratio:.3g} x the tolerance"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(nm=st.sampled_from(NM), out=st.integers(1, 150), groups=st.integers(1, 40),
       batch=st.sampled_from([1, 3, 17, 70]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]), blocks_of=st.integers(0, 6),
       mu_kind=st.sampled_from(["small", "big", "near+", "near-"]), seed=st.integers(0, 2**16))
def test_contract_property(nm, out, groups, batch, dtype, scale_dtype, blocks_of, mu_kind, seed):
    n, m = nm
    k = groups * m
    scale_block = k if blocks_of == 0 else blocks_of * m
    codes, alpha, mu = weight(out, k, n, m, scale_block, mu_kind, seed, scale_dtype)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ys = {"torch": reference_linear(x, codes, alpha, mu, None, n, m, scale_block)}
    for isa in native_isas():
        with native.use_isa(isa):
            ys[isa] = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, n, m, scale_block)
    for path, y in ys.items():
        ratio = fp64_contract_ratio(y, x, codes, alpha, mu, None, n, m, scale_block, ops.TOLERANCE[dtype])
        assert ratio <= 1.0, f"{path}: error {ratio:.3g} x the tolerance"


@pytest.mark.parametrize("mu_kind", ["small", "near-"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_library_states_the_same_contract(mu_kind, with_bias):
    # pbs2p.kernels.reference.contract_ratio (used by the benchmarks) against the tests' own float64 product
    from pbs2p.kernels.reference import contract_ratio

    codes, alpha, mu = weight(40, 96, 4, 8, 24, mu_kind, 5)
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    bias = torch.randn(40).to(torch.bfloat16) if with_bias else None
    y = reference_linear(x, codes, alpha, mu, bias, 4, 8, 24)
    args = (y, x, codes, alpha, mu, bias, 4, 8, 24, 1e-2)
    assert contract_ratio(*args) == pytest.approx(fp64_contract_ratio(*args), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ NaN and Inf, the same on every path
NONFINITE = {
    "x-nan": ("x", float("nan")), "x-inf": ("x", float("inf")), "x--inf": ("x", -float("inf")),
    "alpha-nan": ("alpha", float("nan")), "alpha-inf": ("alpha", float("inf")),
    "mu-nan": ("mu", float("nan")), "mu-inf": ("mu", float("inf")), "mu--inf": ("mu", -float("inf")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("out", [1, 8, 100])
def test_nonfinite_rule_is_the_same_on_every_path(case, dtype, out, monkeypatch):
    # A row of x with NaN/Inf -> NaN in all its outputs; a weight row with a NaN/Inf scale -> NaN in its column.
    # out = 1: the poisoned column can be pruned in every row, which a lookup-table kernel never reads.
    where, value = NONFINITE[case]
    codes, alpha, mu = weight(out, 64, 4, 8, 32, "small", 3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    expected = torch.zeros(5, out, dtype=torch.bool)
    if where == "x":
        x[1, 9] = value
        expected[1] = True
    else:
        (alpha if where == "alpha" else mu)[out // 2, 1] = value
        expected[:, out // 2] = True
    x = x.to(dtype)
    for path, y in every_path(x, codes, alpha, mu, None, 4, 8, 32, monkeypatch).items():
        assert torch.equal(y.isnan(), expected), f"{path}: NaN at {y.isnan().nonzero().tolist()}"
        assert bool(torch.isfinite(y[~expected]).all()), path


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_activations_are_refused_like_a_plain_linear(dtype):
    w = compress_weight(torch.randn(16, 32), PBS2P(n=4, m=8))
    x = torch.ones(2, 32, dtype=dtype)
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, w.dequantize())  # what a plain nn.Linear does
    with pytest.raises(TypeError, match="floating-point activations, got torch"):
        torch.nn.functional.linear(x, w)
    with pytest.raises(TypeError, match="floating-point activations"):
        ops.bsp_linear(x, w.qdata, w.scale, w.zero_point, None, 4, 8, 32)


def test_huge_weights_are_refused_not_turned_into_nan_scales():
    # finite, but too large for the method's float32 arithmetic (the scales used to come out NaN, silently)
    weight_ = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3e37
    assert bool(torch.isfinite(weight_).all())
    with pytest.raises(ValueError, match="scales computed for this weight are not finite"):
        compress_weight(weight_, PBS2P(n=4, m=8))


# ------------------------------------------------------------------ the native build cache
def _run(code: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    script = "import os\nos.environ.setdefault('TORCHAO_FORCE_SKIP_LOADING_SO_FILES', '1')\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)


USE_OPS = """
import warnings, torch
warnings.simplefilter("always")
from pbs2p.kernels import ops
from pbs2p import PBS2P, compress_weight
w = compress_weight(torch.randn(16, 32), PBS2P(n=4, m=8))
y = torch.nn.functional.linear(torch.randn(2, 32), w)
print("BACKEND", ops.kernel_backend(), bool(torch.isfinite(y).all()))
"""


@pytest.fixture
def copied_cache(tmp_path) -> Path:
    """A copy of this installation's cached native build (the one this process loaded), in a cache of its own."""
    if not HAS_COMPILER or not native.load():
        pytest.skip("no native build here")
    key = native._build_key()
    library = native.cache_dir() / key / f"pbs2p_kernels_{key}.so"
    assert library.is_file(), f"no cached library at {library}"
    root = tmp_path / "kernels"
    shutil.copytree(library.parent, root / key, ignore=shutil.ignore_patterns(".build-*", "*.lock"))
    return root


@pytest.fixture
def cannot_build(tmp_path) -> dict[str, str]:
    """An environment whose ``c++`` (the compiler a build uses) answers version queries but fails every compile and
    link: a process that rebuilds fails at once; one that finds its build up to date goes on to load it."""
    real = shutil.which("c++") or shutil.which("g++")
    folder = tmp_path / "bin-g++"  # (torch warns unless the compiler's path names gcc or g++)
    folder.mkdir()
    fake = folder / "c++"
    fake.write_text('#!/bin/sh\nfor arg in "$@"; do case "$arg" in -c|-o|-shared) '
                    'echo "c++: no building in this test" >&2; exit 1;; esac; done\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "CXX"}
    return {**env, "PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}"}


def test_a_verified_cache_loads_without_building(copied_cache, cannot_build):
    env = {**cannot_build, "PBS2P_KERNEL_CACHE": str(copied_cache)}
    result = _run(USE_OPS, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BACKEND native-" in result.stdout and "True" in result.stdout


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "record-changed", "record-missing"])
def test_a_damaged_cached_library_is_never_loaded(copied_cache, cannot_build, damage):
    # dlopen of a truncated library killed the process (SIGBUS) on every run, because the build found it up to
    # date; now it is never opened: the build is redone (here it fails at once) and the torch path runs.
    library = next(copied_cache.glob("*/pbs2p_kernels_*.so"))
    data = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(data[: len(data) // 3])
    elif damage == "zeroed":
        library.write_bytes(bytes(len(data)))
    elif damage == "record-changed":
        record = library.parent / native.RECORD
        entry = json.loads(record.read_text())
        record.write_text(json.dumps({**entry, "sha256": "0" * 64}))
    else:
        (library.parent / native.RECORD).unlink()
    env = {**cannot_build, "PBS2P_KERNEL_CACHE": str(copied_cache)}
    result = _run(USE_OPS, env)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    assert "BACKEND torch True" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "native CPU kernels are unavailable" in result.stderr
    if damage != "record-missing":
        assert "do not match their build record" in result.stderr


def test_verified_library_checks_size_and_hash(copied_cache, monkeypatch):
    assert native.verified_library() == native.library_path(), "the cached library does not match its record"
    monkeypatch.setenv("PBS2P_KERNEL_CACHE", str(copied_cache))
    library = native.verified_library()
    assert library is not None and library.parent.parent == copied_cache
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 1  # same size, one bit changed
    library.write_bytes(bytes(data))
    assert native.verified_library() is None


# ------------------------------------------------------------------ compiled graphs and the backend
COMPILE = """
import torch
torch.set_num_threads(1)
import pbs2p
from pbs2p import PBS2P, quantize_
from pbs2p.kernels.ops import kernel_backend
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64))
quantize_(model, PBS2P(n=4, m=8))
x = torch.randn(3, 64)
with torch.no_grad():
    assert torch.allclose(torch.compile(model)(x), model(x), atol=1e-5)
print("RAN", kernel_backend(), hasattr(torch.ops.pbs2p, "bsp_linear") if kernel_backend() == "torch" else "")
"""


@pytest.mark.skipif(not HAS_COMPILER, reason="no native build here")
def test_a_graph_compiled_with_the_native_operator_is_not_reused_without_it(tmp_path):
    # Same TORCHINDUCTOR_CACHE_DIR: the torch-path process used to get the native process's compiled graph
    # from AOTAutograd's cache, and failed with "'_OpNamespace' 'pbs2p' object has no attribute 'bsp_linear'".
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    first = _run(COMPILE, env)
    assert first.returncode == 0 and "RAN native-" in first.stdout, first.stderr[-3000:]
    second = _run(COMPILE, {**env, "PBS2P_KERNEL": "torch"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "RAN torch False" in second.stdout  # ran, and never loaded the operator
