"""Layer output error on random layers with realistic Hessians: SPBO vs one-shot, compensation vs none.

Errors are measured on held-out inputs (H_eval from other samples than the H used to compress).
These are claims of the method, measured over many layers (measured tables in pbs2p/algorithms/README.md).
"""

from __future__ import annotations

import pytest
from helpers import make_layer

from pbs2p.algorithms import compress, relative_output_error
from pbs2p_lab.baselines import binarize_dense, magnitude_nm_sign

LAYERS = [make_layer(seed, out=48, cols=128, samples=768, dist="gaussian" if seed % 2 else "student",
                     massive=2 if seed % 4 == 3 else 0) for seed in range(16)]


def _errors(n: int, m: int, **kw) -> list[float]:
    out = []
    for W, H, He in LAYERS:
        bw = compress(W, H, n, m, **kw)
        out.append(relative_output_error(W, bw.dequantize(), He))
    return out


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (6, 8)])
@pytest.mark.parametrize("compensation", ["column", "block", "none"])
def test_spbo_beats_oneshot_on_average(nm, compensation):
    n, m = nm
    spbo = _errors(n=n, m=m, compensation=compensation)
    one = _errors(n=n, m=m, compensation=compensation, spbo_steps=0)
    assert sum(spbo) < sum(one)
    assert sum(s < o for s, o in zip(spbo, one, strict=True)) >= 12  # and on most layers


@pytest.mark.parametrize("steps", [None, 0])
@pytest.mark.parametrize("compensation", ["column", "block", "block-diag"])
def test_compensation_never_worse_than_none_on_average(steps, compensation):
    none = _errors(n=4, m=8, spbo_steps=steps, compensation="none")
    comp = _errors(n=4, m=8, spbo_steps=steps, compensation=compensation)
    assert sum(comp) <= sum(none)


def test_column_compensation_per_layer():
    none = _errors(n=4, m=8, compensation="none")
    col = _errors(n=4, m=8, compensation="column")
    assert all(c <= x for c, x in zip(col, none, strict=True))


def test_data_free_beats_floor_and_calibrated_beats_data_free():
    for W, H, He in LAYERS:
        floor = magnitude_nm_sign(W, 4, 8).W_hat
        df = compress(W, None, 4, 8).dequantize()
        cal = compress(W, H, 4, 8).dequantize()
        assert relative_output_error(W, df) <= relative_output_error(W, floor)  # weight space
        assert relative_output_error(W, cal, He) < relative_output_error(W, df, He)  # output space


def test_4of8_close_to_dense_binarization():
    """The paper's claim (pruning + binarization below binarization alone) — measured, not assumed:
    SPBO 4:8 stays within 10% of dense binarization here and 6:8 beats it on average."""
    dense = [relative_output_error(W, binarize_dense(W, H).W_hat, He) for W, H, He in LAYERS]
    six = _errors(n=6, m=8)
    four = _errors(n=4, m=8)
    assert sum(six) < sum(dense)
    assert sum(four) < 1.1 * sum(dense)
