"""``pbs2p::int8_rows_linear`` (the compact embedding / LM head) against the float64 product, on every ISA."""

from __future__ import annotations

import pytest
import torch

from pbs2p.kernels import native
from pbs2p.kernels.ops import int8_rows_linear


def isas() -> list[str]:
    if not native.load():
        pytest.skip("the native operator does not build here")
    return native.supported_isas()


def exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * scale.double()[:, None]).T


@pytest.mark.parametrize("batch", [1, 3, 15, 16, 40])  # 16 and up: the BLAS path
@pytest.mark.parametrize("cols", [1, 7, 16, 67, 576])  # tails of 8 and 16 columns
def test_every_isa_matches_the_exact_product(batch, cols):
    g = torch.Generator().manual_seed(batch * 1000 + cols)
    rows = 261  # 8-row blocks (AVX-512) or 4-row tiles plus a tail, and more than one work item
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
    scale = torch.rand(rows, generator=g) + 0.01
    x = torch.randn(batch, cols, generator=g)
    want = exact(x, q, scale)
    bound = 1e-5 * (x.abs().double() @ (q.double().abs() * scale.double()[:, None]).T) + 1e-12
    for isa in isas():
        with native.use_isa(isa):
            y = torch.ops.pbs2p.int8_rows_linear(x, q, scale)
        assert y.dtype == torch.float32 and y.shape == (batch, rows)
        assert ((y.double() - want).abs() <= bound).all(), isa


def test_bf16_activations_give_bf16_outputs_from_float32_sums():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=g)
    scale = torch.rand(64, generator=g)
    x = torch.randn(2, 3, 96, generator=g).bfloat16()
    for isa in isas():
        with native.use_isa(isa):
            y = int8_rows_linear(x, q, scale)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 64)
        want = exact(x.float().reshape(6, 96), q, scale).reshape(2, 3, 64)
        assert torch.equal(y, want.to(torch.bfloat16)) or (y.double() - want).abs().max() <= 8e-3 * want.abs().max()


def test_torch_path_and_gradients_agree_with_the_native_operator(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (33, 40), dtype=torch.int8, generator=g)
    scale = torch.rand(33, generator=g)
    x = torch.randn(5, 40, generator=g, requires_grad=True)
    y = int8_rows_linear(x, q, scale)  # needs grad: the torch path
    y.sum().backward()
    assert torch.allclose(x.grad, (q.float() * scale[:, None]).sum(0).expand(5, 40), atol=1e-5)
    monkeypatch.setenv("PBS2P_KERNEL", "torch")
    torch_path = int8_rows_linear(x.detach(), q, scale)
    monkeypatch.setenv("PBS2P_KERNEL", "auto")
    assert torch.allclose(int8_rows_linear(x.detach(), q, scale), torch_path, rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch_path, y.detach(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused():
    isas()
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="do not match the 8 columns"):
        torch.ops.pbs2p.int8_rows_linear(torch.ones(1, 7), q, torch.ones(4))
    with pytest.raises(RuntimeError, match="scale must be float32"):
        torch.ops.pbs2p.int8_rows_linear(torch.ones(1, 8), q, torch.ones(3))
    with pytest.raises(RuntimeError, match="2-D int8"):
        torch.ops.pbs2p.int8_rows_linear(torch.ones(1, 8), q.float(), torch.ones(4))
    with pytest.raises(TypeError, match="floating-point activations"):
        int8_rows_linear(torch.ones(1, 8, dtype=torch.int64), q, torch.ones(4))
