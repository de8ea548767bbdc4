"""N:M masks from scores and the saliency scores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pbs2p.algorithms.nm_mask import is_nm, nm_mask_from_scores
from pbs2p.algorithms.saliency import magnitude_saliency, obs_saliency, stbllm_saliency


@given(seed=st.integers(0, 10_000), m=st.sampled_from([2, 4, 8, 16]), data=st.data(), ties=st.booleans())
def test_exactly_n_per_group(seed, m, data, ties):
    n = data.draw(st.integers(1, m))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(5, 4 * m, generator=g)
    if ties:
        scores = scores.round()
    mask = nm_mask_from_scores(scores, n, m)
    assert is_nm(mask, n, m)
    # every kept score >= every pruned score of the same group
    gs, gm = scores.view(5, 4, m), mask.view(5, 4, m)
    kept_min = torch.where(gm, gs, torch.inf).min(-1).values
    pruned_max = torch.where(~gm, gs, -torch.inf).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_neg_inf_scores_never_kept_when_avoidable():
    s = torch.tensor([[-torch.inf, 1.0, -torch.inf, 2.0]])
    assert nm_mask_from_scores(s, 2, 4).tolist() == [[False, True, False, True]]


def test_bad_arguments():
    with pytest.raises(ValueError):
        nm_mask_from_scores(torch.randn(2, 10), 2, 4)
    with pytest.raises(ValueError):
        nm_mask_from_scores(torch.randn(2, 8), 0, 4)
    assert not is_nm(torch.ones(2, 8, dtype=torch.bool), 2, 4)


def test_saliencies():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    torch.testing.assert_close(magnitude_saliency(W), W.square())
    expect = torch.tensor([[1.0, 16.0], [9.0, 0.0]])
    torch.testing.assert_close(obs_saliency(W, torch.tensor([1.0, 0.5])), expect)
    s = stbllm_saliency(W, None)
    # |w|/colsum + |w|/rowsum
    torch.testing.assert_close(s[0, 0], torch.tensor(1 / 4 + 1 / 3))
    s2 = stbllm_saliency(W, torch.tensor([16.0, 1.0]))  # ‖X_j‖ = 4 → factor 4^0.5 = 2
    torch.testing.assert_close(s2[:, 0], 2 * s[:, 0])
