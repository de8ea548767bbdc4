"""The dispatcher ``pbs2p.kernels.ops``: backend choice, forced paths, explicit routing to torch."""

from __future__ import annotations

import warnings

import pytest
import torch

from pbs2p.kernels import native, ops, packing
from pbs2p.kernels.reference import reference_linear


def weight(n: int = 4, m: int = 8, out: int = 70, k: int = 96, scale_block: int = 96):
    g = torch.Generator().manual_seed(0)
    top = torch.rand(out, k // m, m, generator=g).topk(n, -1).indices
    mask = torch.zeros(out, k // m, m, dtype=torch.bool).scatter_(-1, top, True).reshape(out, k)
    codes = packing.pack(mask, torch.rand(out, k, generator=g) > 0.5, n, m)
    blocks = -(-k // scale_block)
    return codes, torch.rand(out, blocks, generator=g) + 0.1, 0.1 * torch.randn(out, blocks, generator=g)


def test_default_backend_is_native_where_it_builds():
    backend = ops.kernel_backend()
    if native.load():
        assert backend == f"native-{native.isa()}"
    else:
        assert backend == "torch"


def test_env_forces_the_torch_path(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.kernel_backend() == "torch"
    codes, alpha, mu = weight()
    x = torch.randn(3, 96)
    y = ops.bsp_linear(x, codes, alpha, mu, None, 4, 8, 96)
    assert torch.equal(y, reference_linear(x, codes, alpha, mu, None, 4, 8, 96))


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_env_forces_an_isa(monkeypatch, isa):
    if not native.load() or isa not in native.supported_isas():
        pytest.skip(f"no native {isa} here")
    previous = native.isa()
    monkeypatch.setenv(ops.ENV_VAR, isa)
    try:
        assert ops.kernel_backend() == f"native-{isa}"
    finally:
        native.set_isa(previous)


def test_env_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="PBS2P_KERNEL"):
        ops.kernel_backend()


@pytest.mark.parametrize(
    ("case", "reason"),
    [("block", "scale_block"), ("half", "dtype")],
)
def test_unsupported_calls_route_to_torch_with_a_warning(monkeypatch, case, reason):
    if not native.load():
        pytest.skip("no native operator")
    scale_block = 20 if case == "block" else 96
    codes, alpha, mu = weight(scale_block=scale_block)
    x = torch.randn(2, 96, dtype=torch.float16 if case == "half" else torch.float32)
    with pytest.warns(RuntimeWarning, match=reason):
        y = ops.bsp_linear(x, codes, alpha, mu, None, 4, 8, scale_block)
    assert torch.equal(y, reference_linear(x, codes, alpha, mu, None, 4, 8, scale_block))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's default: each warning once per place and text
        for _ in range(3):
            ops.bsp_linear(x, codes, alpha, mu, None, 4, 8, scale_block)
    assert len([w for w in seen if reason in str(w.message)]) == 1


def test_failed_build_warns_once_and_uses_the_torch_path(monkeypatch):
    def no_compiler() -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(native, "_build", no_compiler)
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="unavailable"):
            assert ops.kernel_backend() == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ops.kernel_backend() == "torch"  # the failed build is not retried, nor warned about again
            codes, alpha, mu = weight()
            x = torch.randn(1, 96)
            assert torch.equal(
                ops.bsp_linear(x, codes, alpha, mu, None, 4, 8, 96),
                reference_linear(x, codes, alpha, mu, None, 4, 8, 96),
            )
        monkeypatch.setenv(ops.ENV_VAR, "native")
        with pytest.raises(RuntimeError, match="could not be built"):
            ops.kernel_backend()
    finally:
        native._load.cache_clear()
