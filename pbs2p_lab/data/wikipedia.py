"""Plain-text English Wikipedia articles from the dump chunk inside the ``gensim==4.4.0`` wheel.

The wheel carries ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (a real
2016 dump chunk, ~206 pages). We read the bz2 XML straight from the wheel, keep main-namespace
(``<ns>0</ns>``) pages that are not redirects, and strip the wiki markup with mwparserfromhell.
The result (~106 articles, ~0.5 M words) is cached as JSON, keyed by the extractor and
mwparserfromhell versions, so later calls take milliseconds.

Example::

    from pbs2p_lab.data.wikipedia import load_articles
    articles = load_articles()
    print(len(articles), articles[0].title)      # 106 Anarchism
"""

from __future__ import annotations

import bz2
import contextlib
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib.metadata import version

import mwparserfromhell

from pbs2p_lab.assets import cache_dir, extract_member

__all__ = ["Article", "DUMP", "load_articles", "wikitext_to_plain"]

# (wheel, member, sha256) of the dump file we read.
DUMP = (
    "gensim",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
# Bump when the cleaning below changes: the cache key includes it.
EXTRACTOR_VERSION = 2

_XMLNS = "{http://www.mediawiki.org/xml/export-0.10/}"
# Tags whose whole content is not running prose: citations, tables, galleries, formulas.
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score"}
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.IGNORECASE)
_INTERWIKI = re.compile(r"^\s*:?\s*[a-z]{2,3}(-[a-z]{2,8})*\s*:")  # [[de:...]], [[simple:...]] is rare


_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref(?:\s[^>]*)?/>|<ref(?:\s[^>]*)?>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\||!)")


@dataclass(frozen=True)
class Article:
    """One Wikipedia article as plain text."""

    title: str
    text: str


def wikitext_to_plain(wikitext: str) -> str:
    """Strip wiki markup: drop references, tables, files, categories, interlanguage links and
    templates; keep link texts, headings and list items; collapse blank lines.

    Example::

        >>> wikitext_to_plain("'''Paris''' is the [[capital city|capital]].<ref>x</ref>")
        'Paris is the capital.'
    """
    # mwparserfromhell gives up on some malformed constructs and leaves them as text; removing
    # comments and references with regexes first, and table-row lines last, catches those.
    wikitext = _COMMENT.sub("", wikitext)
    wikitext = _REF.sub("", wikitext)
    code = mwparserfromhell.parse(wikitext)
    doomed = [t for t in code.filter_tags() if str(t.tag).strip().lower() in _DROP_TAGS]
    doomed += [
        link for link in code.filter_wikilinks()
        if _DROP_LINK.match(str(link.title)) or _INTERWIKI.match(str(link.title))
    ]
    for node in doomed:
        with contextlib.suppress(ValueError):  # already gone with an enclosing node
            code.remove(node)
    text = code.strip_code(normalize=True, collapse=True)
    lines = [line.strip() for line in text.splitlines() if not _TABLE_LINE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _parse_dump(xml_bytes: bytes) -> list[Article]:
    root = ET.fromstring(xml_bytes)
    articles = []
    for page in root.iter(_XMLNS + "page"):
        if page.findtext(_XMLNS + "ns") != "0" or page.find(_XMLNS + "redirect") is not None:
            continue
        title = page.findtext(_XMLNS + "title") or ""
        wikitext = page.findtext(f"{_XMLNS}revision/{_XMLNS}text") or ""
        text = wikitext_to_plain(wikitext)
        if text:
            articles.append(Article(title, text))
    return articles


def load_articles() -> list[Article]:
    """All main-namespace, non-redirect articles of the dump, in dump order, as plain text (cached)."""
    key = f"enwiki-gensim-4.4.0-x{EXTRACTOR_VERSION}-mwp{version('mwparserfromhell')}.json"
    path = cache_dir() / "text" / key
    if path.exists():
        return [Article(a["title"], a["text"]) for a in json.loads(path.read_text())["articles"]]
    dump = extract_member(*DUMP)
    articles = _parse_dump(bz2.decompress(dump.read_bytes()))
    if not articles:
        raise RuntimeError(f"no articles found in {dump}; the dump format is not what we expect")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    payload = {"source": {"wheel": DUMP[0], "member": DUMP[1], "sha256": DUMP[2]},
               "articles": [{"title": a.title, "text": a.text} for a in articles]}
    tmp.write_text(json.dumps(payload, ensure_ascii=False))
    tmp.replace(path)
    return articles
