"""``pbs2p::bsp_linear_multi`` (several packed weights, one input) and the graph pass that emits it."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import random_packed_weight as random_weight
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import pbs2p
from pbs2p.kernels import native
from pbs2p.kernels.fusion import fuse_packed_linears


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native operator cannot be built here")
    assert native.load(), "the native operator failed to build"


def weights(outs, k, n, m, scale_block, seed, scale_dtype=torch.float32):
    return [random_weight(out, k, n, m, scale_block, scale_dtype, seed + i) for i, out in enumerate(outs)]


def separate(x, ws, n, m, scale_block):
    return [torch.ops.pbs2p.bsp_linear(x, c, a, u, None, n, m, scale_block) for c, a, u in ws]


def fused(x, ws, n, m, scale_block):
    codes, alpha, mu = (list(t) for t in zip(*ws, strict=True))
    return torch.ops.pbs2p.bsp_linear_multi(x, codes, alpha, mu, n, m, scale_block)


@given(
    nm=st.sampled_from([(4, 8), (2, 8), (7, 8), (2, 4), (3, 4), (8, 16)]),
    outs=st.lists(st.integers(1, 200), min_size=1, max_size=4),
    groups=st.integers(1, 40),
    batch=st.sampled_from([(1,), (1, 1), (3,), (2, 3)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    blocks_of=st.integers(0, 3),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_equals_the_separate_calls_bit_for_bit(nm, outs, groups, batch, dtype, scale_dtype, blocks_of, threads,
                                                seed):
    n, m = nm
    k = groups * m
    scale_block = k if blocks_of == 0 else blocks_of * m
    ws = weights(outs, k, n, m, scale_block, seed, scale_dtype)
    x = torch.randn(*batch, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for isa in native.supported_isas():
            with native.use_isa(isa):
                expected, got = separate(x, ws, n, m, scale_block), fused(x, ws, n, m, scale_block)
            assert len(got) == len(outs)
            for e, g in zip(expected, got, strict=True):
                assert g.dtype == e.dtype and torch.equal(g, e), isa
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_products_on_several_threads_equal_the_separate_calls(dtype):
    # q, k, v and gate, up of a mid-sized layer: above the one-thread size together
    k = 1024
    x = torch.randn(1, k, dtype=dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for outs in ([1024, 256, 256], [2816, 2816], [100, 3000, 7]):
            ws = weights(outs, k, 4, 8, 128, len(outs))
            for e, g in zip(separate(x, ws, 4, 8, 128), fused(x, ws, 4, 8, 128), strict=True):
                assert torch.equal(g, e)
    finally:
        torch.set_num_threads(before)


def test_non_finite_inputs_follow_the_rule_of_each_product():
    ws = weights([70, 30], 64, 4, 8, 64, 1)
    for bad in (float("nan"), float("inf"), -float("inf")):  # any of them makes every output of the row NaN
        x = torch.randn(1, 64)
        x[0, 5] = bad
        assert all(y.isnan().all() for y in fused(x, ws, 4, 8, 64)), bad
    c, a, u = ws[1]
    a = a.clone()
    a[3, 0] = float("inf")
    ys = fused(torch.randn(1, 64), [ws[0], (c, a, u)], 4, 8, 64)
    assert ys[0].isfinite().all()
    assert ys[1][0, 3].isnan() and ys[1][0, torch.arange(30) != 3].isfinite().all()


def test_bad_lists_are_refused():
    (c, a, u), (c2, a2, u2) = weights([16, 16], 64, 4, 8, 64, 2)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="same positive length"):
        torch.ops.pbs2p.bsp_linear_multi(x, [], [], [], 4, 8, 64)
    with pytest.raises(RuntimeError, match="same positive length"):
        torch.ops.pbs2p.bsp_linear_multi(x, [c, c2], [a], [u, u2], 4, 8, 64)
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.pbs2p.bsp_linear_multi(torch.randn(1, 128), [c], [a], [u], 4, 8, 64)


def packed_linear(k: int, out: int, bias: bool = False) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, out, bias=bias)
    pbs2p.quantize_(torch.nn.Sequential(lin), pbs2p.PBS2P(n=4, m=8))
    return lin


def count(graph: torch.fx.Graph, name: str) -> int:
    return sum(1 for node in graph.nodes if node.op == "call_function" and getattr(node.target, "name", lambda: "")()
               == f"pbs2p::{name}")


def test_the_pass_fuses_the_calls_on_the_same_input_only():
    q, k, v = packed_linear(64, 64), packed_linear(64, 32), packed_linear(64, 32)
    biased, other = packed_linear(64, 16, bias=True), packed_linear(64, 64)
    gate, up, down = packed_linear(64, 128), packed_linear(64, 128), packed_linear(128, 64)

    def layer(x):
        h = q(x) + other(v(x) @ torch.ones(32, 64)) + biased(x).sum() + k(x).sum()
        return down(torch.nn.functional.silu(gate(h)) * up(h))

    x = torch.randn(1, 64)
    with torch.inference_mode():
        expected = layer(x)
        graph = make_fx(layer)(x)
        assert count(graph.graph, "bsp_linear") == 8
        assert fuse_packed_linears(graph.graph) == 5  # q, k, v on x; gate, up on h
        graph.recompile()
        graph.graph.lint()
        assert count(graph.graph, "bsp_linear_multi") == 2 and count(graph.graph, "bsp_linear") == 3
        assert torch.equal(graph(x), expected)
        assert fuse_packed_linears(graph.graph) == 0  # nothing left to fuse


def test_a_weight_shared_by_two_groups_is_defined_before_both():
    # w multiplies x (with q) and later h (with u), and its constants are first used after u's call: moved up for
    # the first group, they must not move down again for the second
    q, u, w = packed_linear(64, 64), packed_linear(64, 32), packed_linear(64, 32)

    def f(x):
        h = q(x) * 2
        a, b = u(h), w(h)
        return a + b + w(x)

    x = torch.randn(1, 64)
    with torch.inference_mode():
        expected = f(x)
        graph = make_fx(f)(x)
        single = torch.ops.pbs2p.bsp_linear.default
        calls = [n for n in graph.graph.nodes if n.op == "call_function" and n.target == single]
        # make_fx gives each use its own constant nodes: let w(x) read those of w(h), as a compiled graph would
        for late, early in zip(calls[3].args[1:4], calls[2].args[1:4], strict=True):
            calls[3].replace_input_with(late, early)
            graph.graph.erase_node(late)
        assert fuse_packed_linears(graph.graph) == 4
        graph.graph.lint()
        graph.recompile()
        assert torch.equal(graph(x), expected)


def test_the_pass_leaves_graphs_without_packed_linears_alone():
    graph = make_fx(lambda x: torch.nn.functional.linear(x, torch.ones(3, 4)) * 2)(torch.randn(2, 4))
    before = str(graph.graph)
    assert fuse_packed_linears(graph.graph) == 0
    assert str(graph.graph) == before


def test_compiled_with_the_pass_equals_eager():
    q, k = packed_linear(64, 48), packed_linear(64, 16)

    def f(x):
        return q(x) * 2, k(x) - 1

    compiled = torch.compile(f, fullgraph=True, options={"post_grad_custom_post_pass": pbs2p.FusePackedLinears()})
    x = torch.randn(1, 64)
    with torch.inference_mode():
        for a, b in zip(compiled(x), f(x), strict=True):
            assert torch.equal(a, b)
