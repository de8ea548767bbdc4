"""Wikipedia extraction, the calibration / held-out split, and the seeded calibration sampler."""

from __future__ import annotations

import pytest
import torch

from pbs2p_lab.data.calibration import calibration_tokens, sample_segments, tokenize_text
from pbs2p_lab.data.split import SPLIT_RULE, load_split, split_articles
from pbs2p_lab.data.wikipedia import Article, load_articles, wikitext_to_plain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def articles() -> list[Article]:
    return load_articles()


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pbs2p_lab.assets import load_model

    return load_model("tiny")[1]


def test_wikitext_to_plain_keeps_prose_only():
    text = wikitext_to_plain(
        "'''Paris''' is the [[capital city|capital]] of [[France]].<ref>{{cite web|url=x}}</ref>\n"
        "== History ==\n[[File:Paris.jpg|thumb|A caption]]\n{{Infobox|a=b}}\n"
        "{| class=wikitable\n| cell\n|}\n* a list item<ref name=a/>\n[[Category:Cities]]\n[[de:Paris]]"
        "<!-- hidden -->"
    )
    assert text == "Paris is the capital of France.\nHistory\n\na list item"


def test_articles_are_main_namespace_prose(articles):
    assert len(articles) == 106  # 206 pages: 99 redirects and one Wikipedia: page are dropped
    titles = [a.title for a in articles]
    assert len(set(titles)) == len(titles)
    assert not any(t.startswith(("Wikipedia:", "Template:", "Category:")) for t in titles)
    assert sum(len(a.text.split()) for a in articles) > 400_000
    assert not any("{{" in a.text or "<ref" in a.text for a in articles)
    assert sum("[[" in a.text for a in articles) <= 1  # one file link mwparserfromhell cannot parse


def test_split_is_disjoint_complete_and_deterministic(articles):
    split = load_split()
    cal = {a.title for a in split.calibration}
    held = {a.title for a in split.heldout}
    assert cal.isdisjoint(held)
    assert cal | held == {a.title for a in articles}
    assert load_split() == split
    assert split_articles(list(reversed(articles))).heldout == tuple(reversed(split.heldout))
    record = split.describe()
    assert record["rule"] == SPLIT_RULE
    assert record["heldout"]["titles"] == [a.title for a in split.heldout]
    assert record["calibration"]["articles"] + record["heldout"]["articles"] == len(articles)
    assert split.heldout_text not in split.calibration_text


def test_split_fraction_moves_articles_one_way():
    fake = [Article(f"title {i}", "text") for i in range(400)]
    small, large = split_articles(fake, 0.2), split_articles(fake, 0.6)
    assert set(small.heldout) <= set(large.heldout)
    assert 40 < len(small.heldout) < 120 and 180 < len(large.heldout) < 300


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="unique"):
        split_articles([Article("a", "x"), Article("a", "y")])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_articles([Article("a", "x")], 1.0)


def test_sampler_is_seeded():
    stream = torch.arange(10_000)
    a = sample_segments(stream, nsamples=8, seqlen=32, seed=0)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, sample_segments(stream, nsamples=8, seqlen=32, seed=0))
    assert not torch.equal(a, sample_segments(stream, nsamples=8, seqlen=32, seed=1))
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(8, 32))  # contiguous windows of the stream


def test_sampler_edges():
    assert torch.equal(sample_segments(torch.arange(5), 3, 5, seed=0), torch.arange(5).expand(3, 5))
    with pytest.raises(ValueError, match="fewer than seqlen"):
        sample_segments(torch.arange(5), 1, 6)
    with pytest.raises(ValueError, match="1-D"):
        sample_segments(torch.zeros(2, 5, dtype=torch.long), 1, 2)


def test_calibration_tokens_come_from_calibration_text(tiny_tokenizer):
    split = load_split()
    x = calibration_tokens(tiny_tokenizer, nsamples=4, seqlen=64, seed=0, split=split)
    assert x.shape == (4, 64) and x.dtype == torch.long
    assert torch.equal(x, calibration_tokens(tiny_tokenizer, nsamples=4, seqlen=64, seed=0, split=split))
    stream = tokenize_text(tiny_tokenizer, split.calibration_text).tolist()
    as_text = "," + ",".join(map(str, stream)) + ","
    for row in x.tolist():
        assert "," + ",".join(map(str, row)) + "," in as_text
