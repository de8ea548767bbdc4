"""Markdown table and plot (perplexity vs honest bits/weight) from a ``benchmarks/quality.py`` result JSON.

Run ``python benchmarks/quality_report.py benchmarks/results/quality/quality_heldout.json`` to rebuild
``quality_heldout.md`` and ``quality_heldout.png`` next to it (``quality.py`` does this after every run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pbs2p_lab.report import UNIFORM_PPL, quality_table


def plot(record: dict, path: Path) -> None:
    """Perplexity (log) against honest bits per weight, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"pbs2p": "tab:red", "stbllm": "tab:blue", "billm": "tab:green", "sparsegpt": "tab:purple",
              "magnitude": "tab:gray", "binarize": "tab:orange", "fp": "black"}
    for e in record["entries"].values():
        if e.get("ppl") is None:
            continue
        family = e["method"].split("-")[0].split("+")[0]
        bits = min(e["bits_per_weight"], 12.0)
        ax.scatter(bits, e["ppl"], color=colors.get(family, "tab:brown"), s=25)
        ax.annotate(e["method"], (bits, e["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    vocab = {e["vocab_size"] for e in record["entries"].values() if e.get("vocab_size")}
    uniform = vocab.pop() if len(vocab) == 1 else UNIFORM_PPL  # entries written before vocab_size: SmolLM2
    ax.axhline(uniform, ls="--", color="gray", lw=0.8)
    ax.text(0.1, uniform * 1.1, f"uniform guessing over {uniform} tokens", fontsize=7, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("honest bits per weight (every stored bit; FP32 drawn at 12)")
    ax.set_ylabel("perplexity (log scale)")
    ctx = record.get("context", {})
    ax.set_title(f"{ctx.get('model', 'smollm2')}, {ctx.get('text', '')} text, seqlen {ctx.get('seqlen', 2048)}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(path: Path) -> str:
    """Write ``<stem>.md`` and ``<stem>.png`` next to the JSON ``path``; return the markdown."""
    record = json.loads(Path(path).read_text())
    ctx = record.get("context", {})
    head = (f"# Quality on {ctx.get('model', 'smollm2')} ({ctx.get('text', '?')} text)\n\n"
            f"Text: {ctx.get('text_rule', '?')}; windows of {ctx.get('seqlen', 2048)} tokens. "
            f"Produced by `benchmarks/quality.py` (each entry's command is in the JSON). Timings are wall "
            f"seconds on a shared {ctx.get('cpu_count', '?')}-core machine with the 1-minute load average "
            f"before→after compression; peak = peak RSS of the worker process up to the end of compression.\n\n")
    limits = sorted({key.rsplit("limit", 1)[-1] for key in record["entries"]})
    cals = sorted({key.split("|")[1] for key in record["entries"]})
    head += (f"Perplexity windows (`--limit`): {', '.join(limits)}; calibration sets (segments×tokens, seed): "
             f"{', '.join(cals)}.")
    zs = {e["zeroshot"].get("limit") for e in record["entries"].values() if e.get("zeroshot")}
    if zs:
        head += f" Zero-shot: {', '.join(map(str, sorted(zs)))} examples per task (`--zeroshot-limit`)."
    head += ("\n\n`pbs2p-N:M+paper` is the paper's method alone: the binarizer, SPBO (progressive pruning with "
             "refits between steps), CFS (per-block N; its importance normalisation is in the CFS table) and "
             "BiLLM's block-only error compensation. `pbs2p-N:M` is the library default, which adds, per weight, "
             "`act_order` (act-order over M-groups), `refit` (least-squares α, μ under H, then one more sweep "
             "that re-chooses each group's kept set), `obs_weights` (OBS-weighted α/μ fits) and column-by-column "
             "compensation, and in the pipeline `true_seq` (true-sequential stages) and `tune` (a gain and an "
             "offset of each row's kept weights per scale block, tuned on the block's output); `+name` adds one "
             "of them to `+paper`. `billm`, `stbllm-N:M`: BiLLM / STBLLM-style (salient columns + residual "
             "binarization, block-only compensation), plain or with the same `+true_seq+tune`; "
             "`sparsegpt-N:M`: SparseGPT with fp16 kept weights; `magnitude-N:M`: |w| selection + sign·α, no "
             "data. Honest bits count every stored bit with the scales in the dtype they are stored in (fp32 "
             "here, for every method: signs, kept-set indices or masks, salient-column bitmaps, group bitmaps, "
             "scales); paper bits count one bit per kept weight (the peers' convention).")
    md = head + "\n\n" + quality_table(record) + "\n"
    Path(path).with_suffix(".md").write_text(md)
    plot(record, Path(path).with_suffix(".png"))
    return md


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(write_report(Path(arg)))
