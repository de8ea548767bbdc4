"""One report from any result files: ``pbs2p report benchmarks/results/*/*.json --out benchmarks/report``.

Every file the project writes is recognised by its shape (the command-line evaluations of
:mod:`pbs2p_lab.eval.results`, the quality table of ``benchmarks/quality.py``, kernel latencies, decode speed,
checkpoint size, per-layer errors, calibration timings, mutation testing, …); anything else still gets a
table of its top-level values. Every table says what its numbers are: perplexity windows, which accuracy
(``acc_norm`` where the task has it, else ``acc``, as fractions), time units.

Example::

    from pbs2p_lab.report import write_report
    write_report(["benchmarks/results/fp/smollm2_fp32_ppl.json"], "benchmarks/report")
    # -> benchmarks/report/README.md (and ppl_vs_bits.png when the files hold perplexities and bits)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = ["UNIFORM_PPL", "load_rows", "markdown_table", "quality_table", "write_report"]

UNIFORM_PPL = 49152  # uniform guessing over SmolLM2's vocabulary


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _fmt_ppl(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x >= 1e4 else (f"{x:.2f}" if x < 1000 else f"{x:.0f}")


def task_score(scores: dict) -> float | None:
    """The accuracy a task is reported with: ``acc_norm`` where the task has it, else ``acc`` (a fraction)."""
    return scores.get("acc_norm", scores.get("acc"))


# ------------------------------------------------------------------------------ evaluation records
def load_rows(paths: Iterable[str | os.PathLike[str]]) -> list[dict]:
    """One flat row per entry of every ``pbs2p-result-v1`` file (``pbs2p eval`` / ``run``), in file order."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or record.get("schema") != "pbs2p-result-v1":
            raise ValueError(f"{path} is not a pbs2p result file (schema {getattr(record, 'get', dict)('schema')!r})")
        for entry in record["entries"]:
            rows.append({"file": str(path), "model": record["model"]["name"], **entry})
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """Evaluation entries: bits per weight (honest and kept-only), size, perplexity and zero-shot accuracy."""
    tasks = sorted({t for r in rows if r.get("zeroshot") for t in r["zeroshot"]["tasks"]})
    head = ["model", "entry", "method", "N:M", "bits/w (honest)", "bits/w (kept only)", "size MB",
            "perplexity", "windows×seqlen", *tasks, "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = r.get("perplexity") or {}
        windows = f"{ppl['windows']}×{ppl['seqlen']}" if "windows" in ppl else "–"
        scores = (r.get("zeroshot") or {}).get("tasks", {})
        cells = [r["model"], r["label"], r["method"], r.get("nm") or "–", _fmt(r.get("bits_per_weight"), 3),
                 _fmt(r.get("bits_per_weight_kept"), 3), _fmt(r.get("size_mb")), _fmt(ppl.get("ppl")), windows,
                 *(_fmt(task_score(scores[t]), 3) if t in scores else "–" for t in tasks),
                 _fmt(sum((r.get("wall_s") or {}).values()), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if tasks:
        lines += ["", "Task columns: zero-shot accuracy as a fraction (acc_norm where the task has it, else acc), "
                      "validation split; the example limit is in each file."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- quality table
def quality_table(record: dict) -> str:
    """The table of ``benchmarks/quality.py``: perplexity, bits, time and memory per method, then zero-shot
    accuracy, the paper's claims (like with like) and the per-block N that CFS chose."""
    context = record.get("context") or {}
    seqlen = context.get("seqlen", 2048)
    rows = [f"Perplexity of each method on {context.get('text', 'held-out')} text (windows × tokens per window):", "",
            "| method | perplexity | windows×seqlen | honest bits/w | paper bits/w | calibration | compress s "
            "| load avg | peak GiB |",
            "|---|---:|---|---:|---:|---|---:|---|---:|"]
    for e in record["entries"].values():
        cal = e.get("calibration")
        la = e.get("loadavg_before"), e.get("loadavg_after")
        load = f"{la[0][0]:.1f}→{la[1][0]:.1f}" if all(la) else "–"
        calibration = f"{cal['nsamples']}×{cal['seqlen']}" if cal else "none"
        windows = (e.get("ppl_detail") or {}).get("windows")
        windows = f"{len(windows)}×{seqlen}" if windows else "–"
        rows.append(f"| {e['method']} | {_fmt_ppl(e.get('ppl'))} | {windows} | {e['bits_per_weight']:.3f} "
                    f"| {e['paper_bits']:.3f} | {calibration} | {e['compress_s']:.0f} | {load} "
                    f"| {e['peak_rss_gib_compress']:.2f} |")
    out = "\n".join(rows)
    zs = [(e["method"], e["zeroshot"]["tasks"]) for e in record["entries"].values() if e.get("zeroshot")]
    if zs:
        tasks = sorted({t for _, scores in zs for t in scores})
        lines = ["", "Zero-shot accuracy (fraction; acc_norm where the task has it, else acc):", "",
                 "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
        for method, scores in zs:
            values = {t: task_score(s) for t, s in scores.items() if task_score(s) is not None}
            cells = " | ".join(f"{values[t]:.3f}" if t in values else "–" for t in tasks)
            lines.append(f"| {method} | {cells} | {sum(values.values()) / len(values):.3f} |")
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
    return "\n".join(["The paper's claims on these entries (like with like; perplexity):", "",
                      "| claim | perplexity (ours vs baseline) | ratio | holds |", "|---|---|---:|---|", *rows])


def cfs_table(record: dict) -> str:
    """The per-block N that CFS chose, for every PBS²P entry (run-length encoded: ``N×count``)."""
    rows = []
    for e in record["entries"].values():
        ns = e.get("block_n")
        if not ns or not e["method"].startswith("pbs2p"):
            continue
        runs, prev, count = [], ns[0], 0
        for n in [*ns, None]:
            if n == prev:
                count += 1
            else:
                runs.append(f"{prev}×{count}")
                prev, count = n, 1
        if "calibrate" not in e:  # files written before the calibrate options were recorded
            how = "not recorded" + (" (N varies: CFS)" if len(set(ns)) > 1 else "")
        else:
            cfs = (e["calibrate"] or {}).get("cfs")
            how = f"CFS ({cfs['normalize']})" if isinstance(cfs, dict) else "no CFS"
        rows.append(f"| {e['method']} | {how} | {', '.join(runs)} |")
    if not rows:
        return ""
    return "\n".join(["Per-block N (blocks in order, `N×count`):", "", "| method | allocation | N per block |",
                      "|---|---|---|", *rows])


# ----------------------------------------------------------------------------- other result files
def _kernel_table(record: dict) -> str:
    meta = record["meta"]
    lines = [f"Latency of `F.linear`, median milliseconds [min–max] (backend {meta.get('backend')}, "
             f"{meta.get('threads')} threads); speed-up against dense in the same dtype:", "",
             "| out × in | batch | dtype | method | median ms | min–max ms | speed-up |",
             "|---|---:|---|---|---:|---|---:|"]
    for r in record["rows"]:
        lines.append(f"| {r['out']}×{r['in']} | {r['batch']} | {r['dtype']} | {r['method']} | {r['median_ms']:.3f} | "
                     f"{r['min_ms']:.3f}–{r['max_ms']:.3f} | {r.get('speedup_vs_dense', float('nan')):.2f}× |")
    return "\n".join(lines)


def _decode_table(record: dict) -> str:
    lines = [f"Greedy decoding, tokens per second (median of the runs; backend {record.get('kernel_backend')}, "
             f"{record.get('threads')} threads, {record.get('new_tokens')} new tokens):", "",
             "| model | tokens/s |", "|---|---:|"]
    lines += [f"| {name} | {row['tokens_per_s']:.1f} |" for name, row in record["rows"].items()]
    return "\n".join(lines)


def _layer_error_table(record: dict) -> str:
    by: dict[str, list[float]] = {}
    for entry in record["entries"].values():
        by.setdefault(entry["method"], []).append(entry["err_heldout"])
    lines = ["Relative output error ‖(W − Ŵ)X‖/‖WX‖ on held-out inputs, per method over the linears measured:", "",
             "| method | linears | median | max |", "|---|---:|---:|---:|"]
    for method, errors in by.items():
        errors = sorted(errors)
        lines.append(f"| {method} | {len(errors)} | {errors[len(errors) // 2]:.4f} | {errors[-1]:.4f} |")
    return "\n".join(lines)


def _pareto_point(record: dict) -> str:
    return _scalars({k: record.get(k) for k in ("name", "kind", "bits_per_weight", "paper_bits", "ppl",
                                                "compress_s") if k in record},
                    "A point of `benchmarks/pareto.py` (perplexity on held-out text, honest bits per weight):")


def _scalars(record: dict, title: str = "Top-level values:") -> str:
    items = [(k, v) for k, v in record.items() if isinstance(v, str | int | float | bool) or v is None]
    lines = [title, "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v, 4) if isinstance(v, float) else v} |" for k, v in items]
    return "\n".join(lines) if items else title + " (none)"


def _list_table(record: list) -> str:
    keys = sorted({k for item in record if isinstance(item, dict) for k, v in item.items()
                   if isinstance(v, str | int | float | bool)})
    lines = [f"{len(record)} records:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for item in record:
        lines.append("| " + " | ".join(str(item.get(k, "–")) if isinstance(item, dict) else "" for k in keys) + " |")
    return "\n".join(lines)


def agreement_table(record: dict) -> str:
    """The table of ``benchmarks/lm_eval_agreement.py``: each task's metric from ``pbs2p eval`` and from lm-eval."""
    lines = [f"`pbs2p eval` against lm-eval's command line on `{record['model']}`, the same first {record['limit']} "
             "examples of each task (accuracy as a fraction; the metric is named per row):", "",
             "| task | metric | examples | pbs2p eval | lm-eval | equal |", "|---|---|---:|---:|---:|---|"]
    for r in record["rows"]:
        cells = " | ".join("–" if v is None else f"{v:.4f}" for v in (r["pbs2p_eval"], r["lm_eval"]))
        lines.append(f"| {r['task']} | {r['metric']} | {r['n'][0]} | {cells} | {'yes' if r['equal'] else 'NO'} |")
    return "\n".join(lines)


_KINDS: list[tuple[str, Callable[[object], bool], Callable]] = [
    ("evaluation", lambda r: isinstance(r, dict) and r.get("schema") == "pbs2p-result-v1" and "entries" in r,
     lambda r: markdown_table([{"model": r["model"]["name"], **e} for e in r["entries"]])),
    ("quality", lambda r: isinstance(r, dict) and isinstance(r.get("entries"), dict) and "context" in r,
     quality_table),
    ("lm-eval agreement", lambda r: isinstance(r, dict) and "all_equal" in r and isinstance(r.get("rows"), list),
     agreement_table),
    ("layer errors", lambda r: isinstance(r, dict) and r.get("schema") == "pbs2p-layer-error-v1", _layer_error_table),
    ("kernel latency", lambda r: isinstance(r, dict) and "meta" in r and "rows" in r, _kernel_table),
    ("decode speed", lambda r: isinstance(r, dict) and isinstance(r.get("rows"), dict) and "kernel_backend" in r,
     _decode_table),
    ("bits vs perplexity point", lambda r: isinstance(r, dict) and r.get("kind") in ("uniform", "alloc", "fp", "fp16"),
     _pareto_point),
    ("records", lambda r: isinstance(r, list), _list_table),
    ("values", lambda r: isinstance(r, dict), _scalars),
]


def section(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(kind, markdown)`` for one result file; ``ValueError`` naming the file if it is not readable JSON."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the result file {path}: {err}") from err
    for kind, matches, render in _KINDS:
        if matches(record):
            return kind, render(record)
    return "values", f"({type(record).__name__}: no table)"


def _plot_ppl_vs_bits(points: list[tuple[str, float, float]], path: Path) -> Path | None:
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, bits, ppl in points:
        ax.scatter(min(bits, 12.0), ppl, s=18)
        ax.annotate(label, (min(bits, 12.0), ppl), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("honest bits per weight (every stored bit; 32-bit models drawn at 12)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``README.md`` (one section per file) and a perplexity-vs-bits plot into ``out_dir``; return it."""
    if not paths:
        raise ValueError("no result files given")
    sections, points = [], []
    for path in paths:
        kind, body = section(path)
        sections += [f"## `{path}` ({kind})", "", body, ""]
        record = json.loads(Path(path).read_text())
        if kind == "quality":
            points += [(e["method"], e["bits_per_weight"], e["ppl"]) for e in record["entries"].values()
                       if e.get("ppl") is not None]
        elif kind == "evaluation":
            points += [(e["label"], e["bits_per_weight"], e["perplexity"]["ppl"]) for e in record["entries"]
                       if (e.get("perplexity") or {}).get("ppl") is not None and e.get("bits_per_weight")]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# Results", "", f"{len(paths)} result files.", ""]
    if _plot_ppl_vs_bits(points, out / "ppl_vs_bits.png") is not None:
        parts += ["![perplexity against honest bits per weight](ppl_vs_bits.png)", ""]
    readme = out / "README.md"
    readme.write_text("\n".join(parts + sections))
    return readme
