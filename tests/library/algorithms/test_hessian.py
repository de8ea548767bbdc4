"""Hessian damping, dead inputs, singular H, the Cholesky factor of H⁻¹."""

from __future__ import annotations

import pytest
import torch

from pbs2p.algorithms import HessianAccumulator, prepare_hessian, relative_output_error


def hessian_from_inputs(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[-1])
    acc.add(X)
    return acc.hessian()


def test_upper_cholesky_of_inverse():
    X = torch.randn(200, 24, generator=torch.Generator().manual_seed(0))
    prep = prepare_hessian(hessian_from_inputs(X), damp=0.01)
    U = prep.U.double()
    assert torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(prep.H), rtol=1e-4, atol=1e-6)


def test_damping_amount():
    H = torch.diag(torch.tensor([1.0, 3.0]))
    prep = prepare_hessian(H, 0.5)
    assert not prep.dead.any()
    torch.testing.assert_close(torch.diagonal(prep.H), torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_dead_inputs_and_singular_hessian():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 16, generator=g)  # rank 6 < 16: singular
    X[:, 3] = 0.0  # a dead input
    X[:, 5] = X[:, 4]  # exactly collinear inputs
    prep = prepare_hessian(hessian_from_inputs(X), damp=0.0)  # no damping requested: must still work
    assert prep.dead.tolist() == [i == 3 for i in range(16)]
    assert torch.isfinite(prep.U).all()


def test_accumulator_matches_direct():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 7, 8, generator=g)
    acc = HessianAccumulator(8)
    acc.add(X[:2])
    acc.add(X[2])
    Xf = X.reshape(-1, 8).double()
    torch.testing.assert_close(acc.hessian(), (2 * Xf.T @ Xf / Xf.shape[0]).float())


def test_relative_output_error():
    W, X = torch.randn(4, 8), torch.randn(64, 8)
    H = hessian_from_inputs(X)
    expect = torch.linalg.norm((0.5 * W) @ X.T) / torch.linalg.norm(W @ X.T)
    assert abs(relative_output_error(W, 0.5 * W, H) - float(expect)) < 1e-5
    assert relative_output_error(W, W) == 0.0


def test_hessian_sums_in_float64_or_float32_whatever_the_input_dtype():
    x = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(0))
    acc64, acc32, acc_bf16 = HessianAccumulator(16), HessianAccumulator(16, dtype=torch.float32), HessianAccumulator(16)
    acc64.add(x)
    acc32.add(x)
    acc_bf16.add(x.bfloat16())
    assert acc64.sum.dtype == torch.float64 and acc32.sum.dtype == torch.float32
    assert torch.allclose(acc64.hessian(), acc32.hessian(), rtol=1e-5, atol=1e-6)
    assert acc_bf16.hessian().dtype == torch.float32 and acc_bf16.sum.dtype == torch.float64
    with pytest.raises(ValueError, match="float64 or float32"):
        HessianAccumulator(16, dtype=torch.bfloat16)


def test_one_sample_and_no_sample():
    acc = HessianAccumulator(3)
    with pytest.raises(ValueError, match="no calibration inputs reached this layer"):
        acc.hessian()
    acc.add(torch.tensor([[1.0, 2.0, 0.0]]))
    assert torch.equal(acc.hessian(), 2.0 * torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))


def test_half_precision_inputs_multiply_in_float32():
    """A float16 batch's XᵀX is computed in float32: far closer to the exact product than float16 would be."""
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0)).half()
    acc = HessianAccumulator(32)
    acc.add(x)
    exact = 2.0 * x.double().T @ x.double() / 512
    assert torch.allclose(acc.hessian().double(), exact, rtol=1e-5, atol=1e-5)


def test_relative_output_error_edge_cases():
    W = torch.tensor([[3.0, 4.0]])
    assert relative_output_error(W, torch.zeros_like(W)) == 1.0
    assert relative_output_error(W, 0.5 * W) == pytest.approx(0.5)  # weight space: ‖W − Ŵ‖ / ‖W‖
    H = torch.eye(2) * 1e-8  # a tiny but non-zero ‖WX‖ still gives the ratio
    assert relative_output_error(W, 0.5 * W, H) == pytest.approx(0.5)
    zero = torch.zeros(1, 2)
    assert relative_output_error(zero, zero, torch.eye(2)) == 0.0  # nothing reaches the output: no error


def test_accumulator_lives_on_the_device_it_is_given():
    """Every tensor follows the given device (the meta device stands in for a second device type)."""
    acc = HessianAccumulator(4, device="meta")
    acc.add(torch.randn(2, 3, 4))  # inputs are moved to the accumulator's device
    assert acc.sum.device.type == "meta" and acc.hessian().device.type == "meta" and acc.n_samples == 6


def _rank(rank: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    acc = HessianAccumulator(5)
    acc.add(torch.randn(3 + rank, 5, generator=torch.Generator().manual_seed(rank)))  # ranks hold 3 and 4 rows
    acc.all_reduce()
    torch.save((acc.hessian(), acc.n_samples), f"{folder}/{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_gives_every_rank_the_hessian_of_all_inputs(tmp_path):
    """Two gloo ranks, each fed its share: both end with the Hessian and the count of all the inputs."""
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path),), nprocs=2)
    alone = HessianAccumulator(5)
    for rank in (0, 1):
        alone.add(torch.randn(3 + rank, 5, generator=torch.Generator().manual_seed(rank)))
    for rank in (0, 1):
        H, count = torch.load(tmp_path / f"{rank}.pt")
        assert count == 7 and torch.allclose(H, alone.hessian(), rtol=1e-6, atol=1e-7)
