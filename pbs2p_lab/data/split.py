"""Deterministic calibration / held-out split of the Wikipedia articles, at article granularity.

Rule (recorded verbatim in every result): an article goes to the **held-out** part iff
``int(sha256("pbs2p-split-v1:" + title)[:8], 16) % 1000 < round(1000 * heldout_fraction)``,
otherwise to the **calibration** part. The rule depends only on the title, so it does not depend on
article order, and no article (hence no sentence) is in both parts. Compression never sees held-out
text; perplexity is measured only on held-out text.

Example::

    from pbs2p_lab.data.split import load_split
    split = load_split()
    print(len(split.calibration), len(split.heldout))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from pbs2p_lab.data.wikipedia import DUMP, Article, load_articles

__all__ = ["SPLIT_RULE", "TextSplit", "join_articles", "load_split", "split_articles"]

_SALT = "pbs2p-split-v1:"
SPLIT_RULE = (
    f'held-out iff int(sha256("{_SALT}" + title)[:8], 16) % 1000 < round(1000 * heldout_fraction); '
    "else calibration"
)
ARTICLE_SEPARATOR = "\n\n"


def _bucket(title: str) -> int:
    return int(hashlib.sha256((_SALT + title).encode("utf-8")).hexdigest()[:8], 16) % 1000


def join_articles(articles: Sequence[Article]) -> str:
    """One text stream: each article as ``title + "\\n\\n" + text``, articles separated by ``"\\n\\n"``."""
    return ARTICLE_SEPARATOR.join(f"{a.title}\n\n{a.text}" for a in articles)


@dataclass(frozen=True)
class TextSplit:
    """The two disjoint parts, each in dump order."""

    calibration: tuple[Article, ...]
    heldout: tuple[Article, ...]
    heldout_fraction: float

    @property
    def calibration_text(self) -> str:
        return join_articles(self.calibration)

    @property
    def heldout_text(self) -> str:
        return join_articles(self.heldout)

    def describe(self) -> dict:
        """JSON-ready record of the split: source file, rule, and per part the titles, sizes, text sha256."""

        def part(articles: Sequence[Article]) -> dict:
            text = join_articles(articles)
            return {
                "articles": len(articles),
                "chars": len(text),
                "words": len(text.split()),
                "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "titles": [a.title for a in articles],
            }

        return {
            "source": {"wheel": DUMP[0], "member": DUMP[1], "sha256": DUMP[2]},
            "rule": SPLIT_RULE,
            "heldout_fraction": self.heldout_fraction,
            "calibration": part(self.calibration),
            "heldout": part(self.heldout),
        }


def split_articles(articles: Sequence[Article], heldout_fraction: float = 0.5) -> TextSplit:
    """Split ``articles`` by :data:`SPLIT_RULE`. Titles must be unique (they are in a dump)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    titles = [a.title for a in articles]
    if len(set(titles)) != len(titles):
        raise ValueError("article titles must be unique to split by title")
    threshold = round(1000 * heldout_fraction)
    heldout = tuple(a for a in articles if _bucket(a.title) < threshold)
    calibration = tuple(a for a in articles if _bucket(a.title) >= threshold)
    if not heldout or not calibration:
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves one part empty")
    return TextSplit(calibration, heldout, heldout_fraction)


def load_split(heldout_fraction: float = 0.5) -> TextSplit:
    """The split of the packaged Wikipedia articles (:func:`pbs2p_lab.data.wikipedia.load_articles`)."""
    return split_articles(load_articles(), heldout_fraction)
