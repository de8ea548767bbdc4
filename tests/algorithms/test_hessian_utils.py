"""Hessian damping, dead inputs, singular H, the Cholesky factor of H⁻¹."""

from __future__ import annotations

import torch

from pbs2p.algorithms.hessian import (
    HessianAccumulator,
    damp_hessian,
    hessian_from_inputs,
    prepare_hessian,
)


def test_upper_cholesky_of_inverse():
    X = torch.randn(200, 24, generator=torch.Generator().manual_seed(0))
    prep = prepare_hessian(hessian_from_inputs(X), damp=0.01)
    U = prep.U.double()
    assert torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(prep.H), rtol=1e-4, atol=1e-6)


def test_damping_amount():
    H = torch.diag(torch.tensor([1.0, 3.0]))
    Hd, dead = damp_hessian(H, 0.5)
    assert not dead.any()
    torch.testing.assert_close(torch.diagonal(Hd), torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_dead_inputs_and_singular_hessian():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 16, generator=g)  # rank 6 < 16: singular
    X[:, 3] = 0.0  # a dead input
    X[:, 5] = X[:, 4]  # exactly collinear inputs
    prep = prepare_hessian(hessian_from_inputs(X), damp=0.0)  # no damping requested: must still work
    assert prep.dead.tolist() == [i == 3 for i in range(16)]
    assert torch.isfinite(prep.U).all()
    assert prep.damp_used > 0


def test_accumulator_matches_direct():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 7, 8, generator=g)
    acc = HessianAccumulator(8)
    acc.add(X[:2])
    acc.add(X[2])
    torch.testing.assert_close(acc.hessian(), hessian_from_inputs(X.reshape(-1, 8)))
