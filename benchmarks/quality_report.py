"""Markdown table and plot (perplexity vs honest bits/weight) from a ``benchmarks/quality.py`` result JSON.

Run ``python benchmarks/quality_report.py benchmarks/results/quality/quality_heldout.json`` to rebuild
``quality_heldout.md`` and ``quality_heldout.png`` next to it (``quality.py`` does this after every run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

UNIFORM_PPL = 49152  # uniform guessing over SmolLM2's vocabulary


def _fmt_ppl(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 1e4:
        return f"{x:.3g}"
    return f"{x:.2f}" if x < 1000 else f"{x:.0f}"


def _zeroshot_mean(entry: dict) -> tuple[float, dict] | None:
    zs = entry.get("zeroshot")
    if not zs:
        return None
    accs = {task: row.get("acc_norm", row.get("acc")) for task, row in zs["tasks"].items()}
    accs = {k: v for k, v in accs.items() if v is not None}
    return sum(accs.values()) / len(accs), accs


def table(record: dict) -> str:
    """The markdown table of a result record, rows in insertion order."""
    rows = [
        "| method | ppl | honest bits/w | paper bits/w | calibration | compress s | load avg | peak GiB |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for e in record["entries"].values():
        cal = e.get("calibration")
        cal_s = f"{cal['nsamples']}×{cal['seqlen']}" if cal else "none"
        la = e.get("loadavg_before"), e.get("loadavg_after")
        load = f"{la[0][0]:.1f}→{la[1][0]:.1f}" if all(la) else "—"
        rows.append(
            f"| {e['method']} | {_fmt_ppl(e.get('ppl'))} | {e['bits_per_weight']:.3f} | {e['paper_bits']:.3f} | "
            f"{cal_s} | {e['compress_s']:.0f} | {load} | {e['peak_rss_gib_compress']:.2f} |"
        )
    out = "\n".join(rows)
    zs_rows = [(e["method"], _zeroshot_mean(e)) for e in record["entries"].values()]
    zs_rows = [(m, z) for m, z in zs_rows if z]
    if zs_rows:
        tasks = sorted({t for _, (_, accs) in zs_rows for t in accs})
        lines = ["", "Zero-shot accuracy (acc_norm where the task has it, else acc):", "",
                 "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
        for m, (mean, accs) in zs_rows:
            cells = " | ".join(f"{accs[t]:.3f}" if t in accs else "—" for t in tasks)
            lines.append(f"| {m} | {cells} | {mean:.3f} |")
        out += "\n" + "\n".join(lines)
    for extra in (claims_table(record), cfs_table(record)):
        out += "\n\n" + extra if extra else ""
    return out


def claims_table(record: dict) -> str:
    """The paper's claims, like with like: PBS²P 6:8 below the BiLLM-style baseline, and PBS²P at each N:M at
    most half the perplexity of the STBLLM-style baseline at the same N:M — the paper's method alone against
    the plain baselines, and the library default against the baselines with the same harness additions."""
    ppl = {e["method"]: e["ppl"] for e in record["entries"].values() if e.get("ppl") is not None}
    pairs = []
    for suffix, base_suffix in (("+paper", ""), ("", "+true_seq+tune")):
        pairs.append((f"pbs2p-6:8{suffix}", f"billm{base_suffix}", 1.0))
        pairs += [(f"pbs2p-{nm}{suffix}", f"stbllm-{nm}{base_suffix}", 0.5) for nm in ("6:8", "5:8", "4:8", "2:4")]
    rows = []
    for ours, theirs, factor in pairs:
        if ours in ppl and theirs in ppl:
            a, b = ppl[ours], ppl[theirs]
            claim = f"{ours} < {theirs}" if factor == 1.0 else f"{ours} ≤ ½ {theirs}"
            holds = a < b if factor == 1.0 else a <= factor * b
            rows.append(f"| {claim} | {_fmt_ppl(a)} vs {_fmt_ppl(b)} | {a / b:.3f} | {'yes' if holds else 'no'} |")
    if not rows:
        return ""
    return "\n".join(["The paper's claims on these entries (like with like):", "",
                      "| claim | ppl (ours vs baseline) | ratio | holds |", "|---|---|---:|---|", *rows])


def cfs_table(record: dict) -> str:
    """The per-block N that CFS chose, for every PBS²P entry (run-length encoded: ``N×count``)."""
    rows = []
    for e in record["entries"].values():
        ns = e.get("block_n")
        if not ns or not e["method"].startswith("pbs2p"):
            continue
        runs, prev, count = [], ns[0], 0
        for n in ns + [None]:
            if n == prev:
                count += 1
            else:
                runs.append(f"{prev}×{count}")
                prev, count = n, 1
        cfs = (e.get("calibrate") or {}).get("cfs")
        how = f"CFS ({cfs['normalize']})" if isinstance(cfs, dict) else "no CFS"
        rows.append(f"| {e['method']} | {how} | {', '.join(runs)} |")
    if not rows:
        return ""
    return "\n".join(["Per-block N (blocks in order, `N×count`):", "", "| method | allocation | N per block |",
                      "|---|---|---|", *rows])


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
    ax.axhline(UNIFORM_PPL, ls="--", color="gray", lw=0.8)
    ax.text(0.1, UNIFORM_PPL * 1.1, "uniform guessing", fontsize=7, color="gray")
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
    md = head + "\n\n" + table(record) + "\n"
    Path(path).with_suffix(".md").write_text(md)
    plot(record, Path(path).with_suffix(".png"))
    return md


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(write_report(Path(arg)))
