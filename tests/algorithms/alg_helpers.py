"""Small random layers with realistic input Hessians for the algorithm tests."""

from __future__ import annotations

import torch

from pbs2p.algorithms.hessian import hessian_from_inputs
from pbs2p.algorithms.synthetic import synthetic_layer


def make_layer(seed: int, out: int = 32, cols: int = 64, dist: str = "gaussian", samples: int = 512,
               massive: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, H_cal, H_eval)``: one layer with Hessians from two disjoint halves of its inputs."""
    W, X = synthetic_layer(out, cols, samples=2 * samples, dist=dist, seed=seed, massive=massive)
    return W, hessian_from_inputs(X[0::2]), hessian_from_inputs(X[1::2])
