"""The native operator ``pbs2p::bsp_linear`` against the exact (float64) product, on every ISA this CPU runs.

The first test to run builds the operator (about 15 s on 2 cores; cached afterwards).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import torch
from helpers import random_packed_weight as random_weight
from hypothesis import given, settings
from hypothesis import strategies as st

from pbs2p.kernels import native, ops, packing
from pbs2p.kernels.reference import contract_ratio, reference_linear

NM = [(2, 4), (4, 8), (5, 8), (6, 8), (1, 4), (3, 4), (3, 8), (7, 8), (8, 16), (3, 16)]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native operator cannot be built here")
    assert native.load(), "the native operator failed to build"


def isas() -> list[str]:
    native.load()
    return native.supported_isas()


def assert_within_contract(y, x, codes, alpha, mu, bias, n, m, scale_block) -> None:
    """``y`` within ``ops.TOLERANCE`` of the exact float64 product (the contract of ``ops.TOLERANCE``)."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], alpha.shape[0])
    worst = contract_ratio(y, x, codes, alpha, mu, bias, n, m, scale_block, ops.TOLERANCE[x.dtype])
    assert worst <= 1.0, f"error {worst:.3g} x the tolerance"


@given(
    nm=st.sampled_from(NM),
    out=st.integers(1, 150),
    groups=st.integers(1, 40),
    batch=st.sampled_from([(1,), (3,), (17,), (2, 3), (1, 1, 5), (70,)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    blocks_of=st.integers(0, 6),
    with_bias=st.booleans(),
    mu_kind=st.sampled_from(["small", "big", "near+", "near-"]),
    seed=st.integers(0, 2**16),
)
def test_within_contract_on_every_isa(nm, out, groups, batch, dtype, scale_dtype, blocks_of, with_bias, mu_kind, seed):
    n, m = nm
    k = groups * m
    scale_block = k if blocks_of == 0 else blocks_of * m  # per row, or blocks of whole groups
    codes, alpha, mu = random_weight(out, k, n, m, scale_block, scale_dtype, seed, mu_kind)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch, k, generator=g).to(dtype)
    bias = torch.randn(out, generator=g).to(dtype) if with_bias else None
    for isa in isas():
        with native.use_isa(isa):
            y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
        assert_within_contract(y, x, codes, alpha, mu, bias, n, m, scale_block)
    y = reference_linear(x, codes, alpha, mu, bias, n, m, scale_block)
    assert_within_contract(y, x, codes, alpha, mu, bias, n, m, scale_block)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize(("n", "m"), [(4, 8), (2, 4)])
def test_large_batch_spans_several_k_chunks(isa, n, m):
    # 64 batch rows: the tables of 32 groups fill the chunk budget, so K = 1000 takes several chunks,
    # and scale blocks of 96 columns straddle their boundaries.
    if isa not in isas():
        pytest.skip(f"this CPU has no {isa}")
    out, k = 131, 1000
    codes, alpha, mu = random_weight(out, k, n, m, 96, torch.float32, 0)
    x = torch.randn(64, k)
    bias = torch.randn(out)
    with native.use_isa(isa):
        y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, 96)
    assert_within_contract(y, x, codes, alpha, mu, bias, n, m, 96)


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_threads_give_the_same_result(batch):
    # Large enough for several threads at every batch (above the one-thread size at batch 1; several row tiles per
    # item when batch = 64).
    codes, alpha, mu = random_weight(4000, 1024, 4, 8, 128, torch.float32, 4)
    x = torch.randn(batch, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 128)
        torch.set_num_threads(4)
        parallel = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 128)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)
    assert_within_contract(parallel, x, codes, alpha, mu, None, 4, 8, 128)


def _one_thread_product(queue, x, codes, alpha, mu) -> None:
    torch.set_num_threads(1)
    queue.put(torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 128).tolist())  # plain data: the child exits


def test_a_child_forked_after_parallel_calls_runs_on_one_thread():
    # docs/kernels.md: after OpenMP ran, a forked child must use one thread (libgomp does not survive a fork).
    import multiprocessing

    codes, alpha, mu = random_weight(4096, 1024, 4, 8, 128, torch.float32, 5)  # above the one-thread size
    x = torch.randn(1, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 128)  # OpenMP threads started
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_one_thread_product, args=(queue, x, codes, alpha, mu))
    child.start()
    try:
        assert torch.equal(torch.tensor(queue.get(timeout=120)), parallel)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("scale_block", [8, 64, 0])
@pytest.mark.parametrize("x_kind", ["normal", "positive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch1_kept_sums_by_idx(n, scale_block, x_kind, dtype):
    # One row of activations on N:8 weights runs the AVX-512 kernels that read each group's kept sum by idx
    # (bf16 tables for bf16 activations on CPUs with bf16 dot products, float32 tables otherwise; the nibble
    # kernels on other ISAs). 131 rows (a partial tile); K = 5600, whose tables take two chunks; scale blocks of
    # one group, of 8 groups, or one per row; positive activations make the roundings of the table sums add up
    # instead of cancelling.
    k = 5600
    scale_block = scale_block or k
    for mu_kind, scale_dtype in (("small", torch.bfloat16), ("near+", torch.float32)):
        codes, alpha, mu = random_weight(131, k, n, 8, scale_block, scale_dtype, n, mu_kind)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(1, k, generator=g)
        x = (x.abs() if x_kind == "positive" else x).to(dtype)
        bias = torch.randn(131, generator=g).to(dtype)
        for isa in isas():
            with native.use_isa(isa):
                y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, 8, scale_block)
                y3 = torch.ops.pbs2p.bsp_linear(x.view(1, 1, k), codes, alpha, mu, bias, n, 8, scale_block)
            assert_within_contract(y, x, codes, alpha, mu, bias, n, 8, scale_block)
            assert torch.equal(y3.view(1, -1), y)


@pytest.mark.parametrize("scale_block", [0, 64, 256, 2000])
@pytest.mark.parametrize(("n", "m"), [(4, 8), (2, 4), (8, 16), (5, 8)])
def test_bf16_prefill_path(monkeypatch, n, m, scale_block):
    # bf16 activations from PBS2P_BLAS_MIN_BATCH rows on take the expand-to-bf16 + BLAS path where the pair
    # kernels are off (AVX-512 CPUs with bf16 dot products; elsewhere this runs the lookup kernels): W_hat rounded
    # to bf16, then a bf16 GEMM, within the contract of the exact product like every other path.
    monkeypatch.setenv("PBS2P_BLAS_MIN_BATCH", "2")
    monkeypatch.setenv("PBS2P_PAIR_MIN_BATCH", str(2**62))
    scale_block = scale_block or m  # 0: one group per block
    k = 2000 if scale_block == 2000 else 768
    codes, alpha, mu = random_weight(200, k, n, m, scale_block, torch.bfloat16, 3)
    x = torch.randn(3, 5, k, dtype=torch.bfloat16)
    bias = torch.randn(200, dtype=torch.bfloat16)
    y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
    assert_within_contract(y, x, codes, alpha, mu, bias, n, m, scale_block)


PAIR_NM = [(1, 4), (2, 4), (1, 8), (2, 8), (3, 8), (4, 8)]


def pairs_run() -> bool:
    return ops.pair_min_batch() is not None


@pytest.mark.skipif(not pairs_run(), reason="the pair kernels need AVX-512 with bf16 dot products")
@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    nm=st.sampled_from(PAIR_NM),
    out=st.integers(1, 200),
    units=st.integers(1, 70),  # 8 columns each; the kernels take 32 at a time
    batch=st.integers(1, 140),  # 8 rows at a time, blocks of 128
    blocks_of=st.integers(0, 3),
    scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_bias=st.booleans(),
    mu_kind=st.sampled_from(["small", "big", "near+", "near-"]),
    seed=st.integers(0, 2**16),
)
def test_pair_kernels_within_contract(nm, out, units, batch, blocks_of, scale_dtype, with_bias, mu_kind, seed):
    n, m = nm
    k = units * 8
    scale_block = k if blocks_of == 0 else blocks_of * 8  # per row, or blocks of whole units
    codes, alpha, mu = random_weight(out, k, n, m, scale_block, scale_dtype, seed, mu_kind)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(out, generator=g).to(torch.bfloat16) if with_bias else None
    with pair_batches(1):
        assert ops.native_path(torch.bfloat16, batch, n, m, k, scale_block) == "pairs"
        y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
    assert_within_contract(y, x, codes, alpha, mu, bias, n, m, scale_block)


@contextlib.contextmanager
def pair_batches(rows: int):
    """The pair kernels from ``rows`` rows on (``PBS2P_PAIR_MIN_BATCH``), restored afterwards."""
    old = os.environ.get("PBS2P_PAIR_MIN_BATCH")
    os.environ["PBS2P_PAIR_MIN_BATCH"] = str(rows)
    try:
        yield
    finally:
        if old is None:
            del os.environ["PBS2P_PAIR_MIN_BATCH"]
        else:
            os.environ["PBS2P_PAIR_MIN_BATCH"] = old


@pytest.mark.skipif(not pairs_run(), reason="the pair kernels need AVX-512 with bf16 dot products")
@pytest.mark.parametrize(("n", "m"), PAIR_NM)
def test_pair_kernels_on_every_kept_set_and_sign_pattern(n, m):
    # Every kept set x every sign pattern of a unit (8 columns: one N:8 group, or two N:4 groups), one per row, in
    # rows spread over several tiles and blocks of 8 columns; activations powers of two and scales exact in bf16,
    # so every product and sum is exact: the kernels must give the torch path's output bit for bit.
    t = packing.nm_tables(n, m)
    kept_g = t.kept.repeat_interleave(2**n, 0)
    signs_g = ((torch.arange(2**n).repeat(t.kept.shape[0]).unsqueeze(1) >> t.sign_rank.repeat_interleave(2**n, 0))
               & 1).bool() & kept_g
    rows = len(kept_g)
    if m == 4:  # pair every pattern of the first group with every one of the second
        i, j = torch.meshgrid(torch.arange(rows), torch.arange(rows), indexing="ij")
        kept_u = torch.cat([kept_g[i.flatten()], kept_g[j.flatten()]], 1)
        signs_u = torch.cat([signs_g[i.flatten()], signs_g[j.flatten()]], 1)
    else:
        kept_u, signs_u = kept_g, signs_g
    out, units = len(kept_u), 36  # rotate the patterns through the units: every row sees them in every unit
    shift = torch.arange(units)
    order = (torch.arange(out).unsqueeze(1) + 7 * shift) % out  # [out, units]
    kept = kept_u[order].reshape(out, units * 8)
    signs = signs_u[order].reshape(out, units * 8)
    codes = packing.pack(kept, signs, n, m)
    scale_block = 16
    g = torch.Generator().manual_seed(n * m)
    alpha = 2.0 ** torch.randint(-2, 2, (out, units * 8 // scale_block), generator=g).float()
    mu = alpha * 0.5 * torch.randint(-1, 2, alpha.shape, generator=g).float()  # kept weights: +-alpha/2 .. +-3alpha/2
    shape = (9, units * 8)
    x = (2.0 ** torch.randint(-2, 3, shape, generator=g) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)
         * (torch.rand(shape, generator=g) > 0.25)).to(torch.bfloat16)
    with pair_batches(1):
        y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, n, m, scale_block)
    exact = (x.double() @ packing.dequantize(codes, alpha.double(), mu.double(), n, m, scale_block,
                                             dtype=torch.float64).T).to(torch.bfloat16)
    assert torch.equal(y, exact)


@pytest.mark.skipif(not pairs_run(), reason="the pair kernels need AVX-512 with bf16 dot products")
def test_pair_kernels_many_tiles_chunks_and_batch_blocks():
    # 18 row tiles (36 halves: items that start and end inside a tile), 257 units (9 chunks of up to 32), 133 rows
    # (a block of 128 and 5 more); 1100 rows and 2056 columns: the activations spread beforehand
    n, m, out, k = 4, 8, 1100, 2056
    codes, alpha, mu = random_weight(out, k, n, m, 64, torch.bfloat16, 11)
    x = torch.randn(133, k, dtype=torch.bfloat16)
    bias = torch.randn(out, dtype=torch.bfloat16)
    assert ops.native_path(torch.bfloat16, 133, n, m, k, 64) == "pairs"
    y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, 64)
    assert_within_contract(y, x, codes, alpha, mu, bias, n, m, 64)
    with pair_batches(2**62):
        assert ops.native_path(torch.bfloat16, 133, n, m, k, 64) == "blas"
        blas = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, 64)
    assert not torch.equal(y, blas)  # the two paths sum in other orders: the pair kernels really ran


def test_native_path_by_pattern_and_batch(monkeypatch):
    monkeypatch.delenv("PBS2P_PAIR_MIN_BATCH", raising=False)
    monkeypatch.delenv("PBS2P_BLAS_MIN_BATCH", raising=False)
    rows = ops.pair_min_batch()
    assert ops.native_path(torch.bfloat16, 1, 4, 8, 4096, 4096) == "tables"
    if rows is None:
        assert "pairs" not in {ops.native_path(torch.bfloat16, b, 4, 8, 4096, 4096) for b in (1, 8, 128, 4096)}
        return
    assert ops.native_path(torch.bfloat16, rows - 1, 4, 8, 4096, 4096) == "tables"
    assert ops.native_path(torch.bfloat16, rows, 4, 8, 4096, 4096) == "pairs"
    assert ops.native_path(torch.bfloat16, rows, 2, 4, 4096, 8) == "pairs"
    assert ops.native_path(torch.float32, 128, 4, 8, 4096, 4096) == "tables"  # float32: AVX-512 tables
    blas = ops.blas_min_batch(torch.bfloat16)
    # more than 4 kept weights per 8 columns, N:16, or N:4 scale blocks of 4 columns: expand + BLAS
    for n, m, scale_block in [(5, 8, 4096), (3, 4, 4096), (8, 16, 4096), (2, 4, 4)]:
        assert ops.native_path(torch.bfloat16, rows, n, m, 4096, scale_block) == "tables"
        assert ops.native_path(torch.bfloat16, blas, n, m, 4096, scale_block) == "blas"


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "m", "scale_block"), [(4, 8, 128), (2, 4, 4), (1, 4, 768), (8, 16, 64), (5, 8, 2000)])
def test_f32_prefill_path_is_the_torch_path(monkeypatch, isa, scale_dtype, n, m, scale_block):
    # float32 activations from PBS2P_BLAS_MIN_BATCH rows on take the expand + BLAS path on every ISA:
    # W_hat expanded exactly as the torch path computes it, so the output is the torch path's, bit for bit.
    if isa not in isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("PBS2P_BLAS_MIN_BATCH", "2")
    k = 2000 if scale_block == 2000 else 768
    codes, alpha, mu = random_weight(200, k, n, m, scale_block, scale_dtype, 5)
    x, bias = torch.randn(3, 5, k), torch.randn(200)
    with native.use_isa(isa):
        y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
        monkeypatch.delenv("PBS2P_BLAS_MIN_BATCH")
        tables = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
    assert torch.equal(y, reference_linear(x, codes, alpha, mu, bias, n, m, scale_block))
    assert not torch.equal(y, tables)  # the tables sum in another order: the two paths really differ
    assert_within_contract(y, x, codes, alpha, mu, bias, n, m, scale_block)


def test_blas_batch_by_isa(monkeypatch):
    with native.use_isa(isas()[-1]):
        best = ops.blas_min_batch(torch.float32)
    assert best == (None if isas()[-1] == "avx512" else 32)
    with native.use_isa("scalar"):
        assert ops.blas_min_batch(torch.float32) == 32
        assert ops.blas_min_batch(torch.bfloat16) is None
    monkeypatch.setenv("PBS2P_BLAS_MIN_BATCH", "7")
    assert ops.blas_min_batch(torch.float32) == ops.blas_min_batch(torch.bfloat16) == 7


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_kept_set_and_sign_pattern(isa):
    # All C(8, n) kept sets x all 2^n sign patterns, one per row, against the dense weight, per ISA.
    if isa not in isas():
        pytest.skip(f"this CPU has no {isa}")
    for n in range(1, 8):
        t = packing.nm_tables(n, 8)
        kept = t.kept.repeat_interleave(2**n, 0)  # [C * 2^n, 8]
        sign_bits = torch.arange(2**n).repeat(t.kept.shape[0])
        signs = ((sign_bits.unsqueeze(1) >> t.sign_rank.repeat_interleave(2**n, 0)) & 1).bool() & kept
        codes = packing.pack(kept, signs, n, 8)
        alpha, mu = torch.full((len(kept), 1), 0.5), torch.full((len(kept), 1), 0.25)
        x = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]])
        with native.use_isa(isa):
            y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, n, 8, 8)
        # powers of two: every sum is exact in fp32, so the kernel must be bit-exact
        assert torch.equal(y, reference_linear(x, codes, alpha, mu, None, n, 8, 8))


def test_edge_shapes():
    codes, alpha, mu = random_weight(1, 8, 4, 8, 8, torch.float32, 0)
    assert torch.ops.pbs2p.bsp_linear(torch.randn(0, 8), codes, alpha, mu, None, 4, 8, 8).shape == (0, 1)
    x = torch.randn(8)  # no batch dimension
    y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 8)
    assert_within_contract(y, x, codes, alpha, mu, None, 4, 8, 8)
    x = torch.randn(4, 5, 8).transpose(0, 1)  # not contiguous
    y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 8)
    assert_within_contract(y, x, codes, alpha, mu, None, 4, 8, 8)


def test_rejects_inconsistent_inputs():
    codes, alpha, mu = random_weight(70, 64, 4, 8, 64, torch.float32, 0)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 2, 4, 64)
    with pytest.raises(RuntimeError, match="not a multiple"):
        torch.ops.pbs2p.bsp_linear(torch.randn(2, 60), codes, alpha, mu, None, 4, 8, 64)
    with pytest.raises(RuntimeError, match="blocks"):
        torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.pbs2p.bsp_linear(x.half(), codes, alpha, mu, None, 4, 8, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(dtype, with_bias):
    codes, alpha, mu = random_weight(70, 96, 4, 8, 32, torch.float32, 0)
    x = torch.randn(3, 96, dtype=dtype)
    bias = torch.randn(70, dtype=dtype) if with_bias else None
    torch.library.opcheck(torch.ops.pbs2p.bsp_linear.default, (x, codes, alpha, mu, bias, 4, 8, 32))


@pytest.mark.parametrize("scale_block", [32, 96])
def test_gradients_match_the_torch_path(scale_block):
    codes, alpha, mu = random_weight(70, 96, 4, 8, scale_block, torch.float32, 2)
    bias = torch.randn(70)
    x = torch.randn(2, 3, 96)
    leaves = [t.clone().requires_grad_() for t in (x, alpha, mu, bias)]
    native_out = ops.bsp_linear(leaves[0], codes, *leaves[1:3], leaves[3], 4, 8, scale_block)
    ref_leaves = [t.clone().requires_grad_() for t in (x, alpha, mu, bias)]
    ref_out = reference_linear(ref_leaves[0], codes, *ref_leaves[1:3], ref_leaves[3], 4, 8, scale_block)
    grad = torch.randn_like(ref_out)
    native_grads = torch.autograd.grad(native_out, leaves, grad)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad)
    for got, want in zip(native_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    args = (leaves[0].detach().requires_grad_(), codes, alpha.requires_grad_(), mu, bias, 4, 8, scale_block)
    torch.library.opcheck(torch.ops.pbs2p.bsp_linear.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_is_one_node_and_matches_eager(dtype):
    codes, alpha, mu = random_weight(100, 136, 2, 4, 136, torch.float32, 1)
    bias = torch.randn(100)
    x = torch.randn(2, 5, 136, dtype=dtype)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(ops.bsp_linear(x, codes, alpha, mu, bias, 2, 4, 136))

    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)(x)
    op = torch.ops.pbs2p.bsp_linear
    calls = [nd for nd in graphs[0].graph.nodes if nd.target in (op, op.default)]
    assert len(graphs) == 1 and len(calls) == 1
    assert torch.equal(compiled, f(x))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))  # inductor
