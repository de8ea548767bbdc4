"""Markdown tables and plots from saved result JSONs (:mod:`pbs2p_lab.eval.results`).

Example::

    from pbs2p_lab.report import write_report
    write_report(["benchmarks/results/fp/smollm2_fp32.json"], "benchmarks/report")
    # -> benchmarks/report/README.md, ppl_vs_bits.png (and per_layer_error.png when present)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["load_rows", "markdown_table", "plot_per_layer", "plot_ppl_vs_bits", "write_report"]


def load_rows(paths: Iterable[str | os.PathLike[str]]) -> list[dict]:
    """One flat row per entry of every result file (shared fields copied in), in file order."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        if record.get("schema") != "pbs2p-result-v1":
            raise ValueError(f"{path} is not a pbs2p result file (schema {record.get('schema')!r})")
        for entry in record["entries"]:
            rows.append({"file": str(path), "model": record["model"]["name"], **entry})
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """A markdown table: model, entry, method, N:M, bits/weight (honest and paper), size, ppl, tasks."""
    tasks = sorted({t for r in rows if r.get("zeroshot") for t in r["zeroshot"]["tasks"]})
    head = ["model", "entry", "method", "N:M", "bits/w (honest)", "bits/w (kept only)", "size MB",
            "ppl", "windows×seqlen", *tasks, "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = r.get("perplexity") or {}
        windows = f"{ppl['windows']}×{ppl['seqlen']}" if "windows" in ppl else "–"
        scores = (r.get("zeroshot") or {}).get("tasks", {})
        cells = [
            r["model"], r["label"], r["method"], r.get("nm") or "–",
            _fmt(r.get("bits_per_weight"), 3), _fmt(r.get("bits_per_weight_kept"), 3),
            _fmt(r.get("size_mb")), _fmt(ppl.get("ppl")), windows,
            *(_fmt(100 * scores[t]["acc"], 1) if t in scores else "–" for t in tasks),
            _fmt(sum((r.get("wall_s") or {}).values()), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if tasks:
        lines.append("")
        lines.append("Task columns: zero-shot accuracy (%), validation split; `limit` is in each file.")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_bits(rows: Sequence[dict], path: str | os.PathLike[str]) -> Path | None:
    """Perplexity (log scale) against honest bits/weight, one marker style per method; None if no data."""
    points = [r for r in rows if r.get("perplexity") and r.get("bits_per_weight") is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in points}):
        mine = [r for r in points if r["method"] == method]
        ax.scatter([r["bits_per_weight"] for r in mine], [r["perplexity"]["ppl"] for r in mine], label=method)
        for r in mine:
            ax.annotate(r.get("nm") or r["label"], (r["bits_per_weight"], r["perplexity"]["ppl"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the compressed linears (every stored bit)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_ERROR_KINDS = {  # key in a per_layer item -> axis label
    "output_rel_error": "relative output error ‖WX − ŴX‖ / ‖WX‖",
    "weight_rel_error": "relative weight error ‖W − Ŵ‖ / ‖W‖",
}


def plot_per_layer(rows: Sequence[dict], path: str | os.PathLike[str]) -> Path | None:
    """Relative error of every compressed linear in model order, one line per entry; None if absent.

    Uses ``output_rel_error`` when every plotted entry has it, else ``weight_rel_error``.
    """
    with_layers = [r for r in rows if r.get("per_layer")]
    if not with_layers:
        return None
    key = next(k for k in (*_ERROR_KINDS, None)
               if k is None or all(k in layer for r in with_layers for layer in r["per_layer"]))
    if key is None:
        raise ValueError(f"per_layer items need one of {list(_ERROR_KINDS)} in every entry")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in with_layers:
        errors = [layer[key] for layer in r["per_layer"]]
        ax.plot(range(len(errors)), errors, marker=".", linewidth=0.8, label=f"{r['model']} {r['label']}")
    ax.set_yscale("log")
    ax.set_xlabel("compressed linear (model order)")
    ax.set_ylabel(_ERROR_KINDS[key])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``README.md`` (the table, linking the plots) and the plots into ``out_dir``; return its path."""
    if not paths:
        raise ValueError("no result files given")
    rows = load_rows(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# Results", "", markdown_table(rows), ""]
    for plot, name in ((plot_ppl_vs_bits, "ppl_vs_bits.png"), (plot_per_layer, "per_layer_error.png")):
        if plot(rows, out / name) is not None:
            parts += [f"![{name}]({name})", ""]
    parts += ["Sources: " + ", ".join(f"`{p}`" for p in paths), ""]
    readme = out / "README.md"
    readme.write_text("\n".join(parts))
    return readme
