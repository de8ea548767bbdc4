"""Two evaluations of the same held-out windows, compared window by window.

    python benchmarks/compare_windows.py A.json B.json [--first 40] [--out results/.../name.md]

``A.json`` and ``B.json`` are ``pbs2p eval --ppl-limit all --out ...`` files (the first entry of each) over
the same windows. It prints, and writes to the markdown file ``--out`` when given, the perplexity of each
over every window, over the first ``--first`` windows and over the rest, the median ratio of B's window
perplexity to A's, how many windows B does better, and the window where B is worst against A. The split
shows whether a difference on a short evaluation holds on the windows it did not see.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def windows(path: Path) -> tuple[str, list[float], int]:
    """The command, per-window NLL sums and predicted tokens per window of a ``pbs2p eval`` file's first entry."""
    record = json.loads(Path(path).read_text())
    entry = record["entries"][0]
    ppl = entry["perplexity"]
    nll = ppl["window_nll"]
    if ppl["predicted_tokens"] % len(nll):
        raise ValueError(f"{path}: windows of unequal length ({ppl['predicted_tokens']} tokens, {len(nll)} windows)")
    return record["command"], nll, ppl["predicted_tokens"] // len(nll)


def compare(a: list[float], b: list[float], tokens: int, start: int, stop: int) -> dict:
    """Perplexities of A and B over windows ``[start, stop)`` and how B's windows compare with A's."""
    x, y = a[start:stop], b[start:stop]
    ratios = [math.exp((v - u) / tokens) for u, v in zip(x, y, strict=True)]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    ppl_a, ppl_b = math.exp(sum(x) / (tokens * len(x))), math.exp(sum(y) / (tokens * len(y)))
    return {"windows": [start, stop], "ppl_a": ppl_a, "ppl_b": ppl_b, "change": ppl_b / ppl_a - 1,
            "median_window_ratio": statistics.median(ratios), "b_better": sum(r < 1 for r in ratios),
            "worst_window": start + worst, "worst_window_ppl_ratio": ratios[worst],
            "worst_window_nll_ratio": y[worst] / x[worst]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--first", type=int, default=40, help="size of the first slice of windows (default 40)")
    ap.add_argument("--out", type=Path, help="markdown file to write")
    args = ap.parse_args(argv)
    command_a, a, tokens = windows(args.a)
    command_b, b, tokens_b = windows(args.b)
    if len(a) != len(b) or tokens != tokens_b:
        raise SystemExit(f"the two files cover different windows ({len(a)}×{tokens} and {len(b)}×{tokens_b})")
    if not 0 < args.first < len(a):
        raise SystemExit(f"--first must be between 1 and {len(a) - 1}, got {args.first}")
    rows = {"all": compare(a, b, tokens, 0, len(a)), f"first {args.first}": compare(a, b, tokens, 0, args.first),
            "the rest": compare(a, b, tokens, args.first, len(a))}
    lines = [f"- A: `{args.a.name}` (`{command_a}`)", f"- B: `{args.b.name}` (`{command_b}`)", "",
             f"{len(a)} windows of {tokens} predicted tokens; the ratios are B's window perplexity over A's:", "",
             "| windows | A ppl | B ppl | B vs A | median ratio | B better | worst window (ppl ratio, NLL ratio) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        n = r["windows"][1] - r["windows"][0]
        lines.append(f"| {name} ({r['windows'][0]}–{r['windows'][1] - 1}) | {r['ppl_a']:.2f} | {r['ppl_b']:.2f} "
                     f"| {r['change']:+.2%} | {r['median_window_ratio']:.3f} | {r['b_better']}/{n} "
                     f"| {r['worst_window']} ({r['worst_window_ppl_ratio']:.2f}×, "
                     f"{r['worst_window_nll_ratio']:.2f}×) |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Window by window\n\n`python benchmarks/compare_windows.py "
                                               f"{args.a} {args.b} --first {args.first}`\n\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
