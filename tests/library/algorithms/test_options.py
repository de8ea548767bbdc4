"""Every option of ``compress`` does what its name says: each addition changes the result (a label that names
an addition means it ran), the refinement rounds reach every fit, the defaults are :class:`pbs2p.PBS2P`'s,
and a refused weight is named with what was wrong."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from helpers import make_layer

from pbs2p import PBS2P
from pbs2p.algorithms import compress
from pbs2p.algorithms.method import EXTRAS, check_weight

FIELDS = ("mask", "signs", "alpha", "mu")


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


@pytest.fixture(scope="module")
def layer():
    W, H, _ = make_layer(3, out=24, cols=256, samples=512)
    return W, H


@pytest.mark.parametrize("extra", EXTRAS)
def test_each_addition_changes_the_result(layer, extra):
    """Removing one addition from all of them, or adding it alone to none, changes the packed result."""
    W, H = layer
    others = [x for x in EXTRAS if x != extra]
    assert not same(compress(W, H, 4, 8, extras=others), compress(W, H, 4, 8, extras=EXTRAS))
    assert not same(compress(W, H, 4, 8, extras=[extra]), compress(W, H, 4, 8, extras=[]))


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("steps", [None, 0, 2])
def test_refine_rounds_reach_every_fit(layer, calibrated, steps):
    """``refine_rounds`` is passed to the binarizer's fits on every path (data-free SPBO, one-shot, with data)."""
    W, H = layer
    H = H if calibrated else None
    assert not same(compress(W, H, 4, 8, spbo_steps=steps, refine_rounds=1),
                    compress(W, H, 4, 8, spbo_steps=steps, refine_rounds=3))


def test_defaults_are_the_configs():
    """``compress``'s defaults are those of ``PBS2P()``, so the method alone and the config agree."""
    params = inspect.signature(compress).parameters
    config = PBS2P()
    shared = [f.name for f in dataclasses.fields(PBS2P)
              if f.name in params and params[f.name].default is not inspect.Parameter.empty]
    assert {"scale_block", "spbo_steps", "refine_rounds", "compensation", "extras"} <= set(shared)
    for name in shared:
        default = params[name].default
        assert (list(default) if name == "extras" else default) == getattr(config, name), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.ones(2, 0),), "W must be a non-empty 2-D tensor, got torch.Size([2, 0])"),
        (([1.0, 2.0],), "W must be a non-empty 2-D tensor, got list"),
        ((torch.ones(3), "H"), "H must be a non-empty 2-D tensor, got torch.Size([3])"),
        ((torch.ones(2, 3), "H", 3), "H must be [3, 3] (in_features of W), got (2, 3)"),
    ],
)
def test_refusals_name_the_tensor_and_what_it_is(args, message):
    with pytest.raises(ValueError) as info:
        check_weight(*args)
    assert str(info.value) == message


def test_a_single_weight_is_a_weight():
    check_weight(torch.ones(1, 1))
    check_weight(torch.ones(1, 1), "H", square=1)
