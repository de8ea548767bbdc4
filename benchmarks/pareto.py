"""Held-out perplexity against honest bits per weight: uniform PBS²P settings and bit-budget allocations.

Every point compresses the decoder linears of a fresh model through :class:`pbs2p.pipeline.SequentialRunner`
(block by block; each block calibrated on the outputs of the already-compressed blocks before it) and
measures held-out perplexity on the first ``--limit`` windows of ``--seqlen`` tokens. Points (``--points``):

* ``fp`` — the uncompressed model (fp32 storage: 32 bits); ``fp16`` — every decoder linear stored in fp16;
* ``N:M`` — PBS²P (library defaults: SPBO, column compensation, per-row fp32 α, μ) at N:M in every linear;
* ``bB`` — the allocation of :func:`pbs2p_lab.budget.allocate_bits` at ``B`` bits per weight: each
  linear gets one of ``spbo-{2:4,4:8,5:8,6:8}/column`` or ``fp16``, minimising the sum of the linears'
  relative output errors on the *calibration* text measured by ``benchmarks/layer_error.py`` (in isolation;
  never the held-out text the perplexity is measured on) with the honest
  average bits over all decoder linears ``<=`` B (the slack is reported).

Bits are the stored bytes of every decoder linear (packed codes, index, scales; fp16 weights at 16) over
their weights; embeddings and the LM head stay in full precision and are not counted (as in every peer).

Resumable: each point is a JSON under ``points/`` and is skipped when present with the same settings.
Each run rewrites ``README.md`` (table, plot, the 3× statement) from all points.

    python -m benchmarks.pareto                                         # the default points
    python -m benchmarks.pareto --points fp,4:8,b2,b8 --limit 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files
if __package__ in (None, ""):  # run as a file: make `benchmarks` and `pbs2p` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pbs2p_lab.budget import BitAllocation, Candidate, allocate_bits, layer_bits  # noqa: E402

RESULTS = Path("benchmarks/results/pareto")
LAYER_ERRORS = Path("benchmarks/results/layer_error/layer_error.json")
FP_RESULT = Path("benchmarks/results/fp/smollm2_fp32_ppl.json")
ALLOC_METHODS = ("spbo-2:4/column", "spbo-4:8/column", "spbo-5:8/column", "spbo-6:8/column", "fp16")
DEFAULT_POINTS = "fp,4:8,2:4,5:8,6:8,b2,b4,b14,b14.5,b15,b15.5,fp16"  # computed in this order
WITHIN = 3.0  # the statement: smallest bits with perplexity <= WITHIN × FP


def parse_point(spec: str) -> dict:
    """``fp`` / ``fp16`` / ``N:M`` / ``bB`` → a point description."""
    if spec in ("fp", "fp16"):
        return {"name": spec, "kind": spec}
    if spec.startswith("b"):
        return {"name": spec, "kind": "alloc", "target": float(spec[1:])}
    n, m = (int(x) for x in spec.split(":"))
    return {"name": f"{n}of{m}", "kind": "uniform", "n": n, "m": m}


# ------------------------------------------------------------------------------------------ allocation
def allocation(layer_errors: dict, linears: dict[str, int], target: float) -> tuple[BitAllocation, list[str]]:
    """The allocation at ``target`` bits/weight from ``layer_error.json`` entries; keys in model order."""
    entries = layer_errors["entries"]
    keys = list(linears)
    missing = [f"{meth}|{k}" for k in keys for meth in ALLOC_METHODS if f"{meth}|{k}" not in entries]
    if missing:
        raise SystemExit(
            f"{len(missing)} (method, linear) errors missing from the layer errors, e.g. {missing[0]}; "
            "run: python -m benchmarks.layer_error --layers all --methods alloc"
        )
    candidates = [
        [
            Candidate(
                meth, layer_bits(entries[f"{meth}|{k}"]["bits"], linears[k]), entries[f"{meth}|{k}"]["err_calib"]
            )
            for meth in ALLOC_METHODS
        ]
        for k in keys
    ]
    return allocate_bits(candidates, [linears[k] for k in keys], target), keys


# ------------------------------------------------------------------------------------------ one point
def run_point(point: dict, args: argparse.Namespace) -> dict:
    """Compress (unless fp) and measure one point; returns its record."""
    from pbs2p import compress_weight
    from pbs2p.config import PBS2P
    from pbs2p.pipeline import SequentialRunner
    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.calibration import calibration_tokens, describe_calibration
    from pbs2p_lab.data.split import load_split
    from pbs2p_lab.eval.perplexity import heldout_perplexity

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    if point["kind"] == "fp" and args.fp_from:
        record = fp_from_file(point, args)
        if record is not None:
            return record
    model, tok = load_model(args.model)
    split = load_split()
    from benchmarks.activations import decoder_linears

    linears = {f"{i}.{name}": mod for i, name, mod in decoder_linears(model)}
    numel = {k: mod.weight.numel() for k, mod in linears.items()}
    plan: dict[str, str] = {}
    extra: dict = {}
    if point["kind"] == "fp":
        plan = {k: "fp32" for k in linears}
    elif point["kind"] == "fp16":
        plan = {k: "fp16" for k in linears}
    elif point["kind"] == "uniform":
        plan = {k: f"spbo-{point['n']}:{point['m']}/column" for k in linears}
    else:
        errors = json.loads(Path(args.layer_errors).read_text())
        alloc, keys = allocation(errors, numel, point["target"])
        plan = dict(zip(keys, alloc.labels, strict=True))
        extra["allocation"] = {
            "target_bits": alloc.target_bits,
            "planned_average_bits": alloc.average_bits,
            "slack_per_weight": alloc.slack_per_weight,
            "slack_bits": alloc.slack_bits,
            "objective_sum_rel_error": alloc.objective,
            "exact": alloc.exact,
            "counts": dict(Counter(alloc.labels)),
            "layer_errors": {"file": str(args.layer_errors), "settings": errors["settings"]},
        }
    records, t_compress = [], 0.0
    if any(v != "fp32" for v in plan.values()):
        t1 = time.perf_counter()
        calib = calibration_tokens(tok, args.nsamples, args.calib_seqlen, args.seed, split)
        # fp16 layers are rounded in place up front (exactly what 16-bit storage holds) and left out of the
        # runner's targets, so no Hessian is collected for them
        with torch.no_grad():
            for k, setting in plan.items():
                if setting == "fp16":
                    linears[k].weight.copy_(linears[k].weight.half().float())
        runner = SequentialRunner(model, calib, args.batch_size)
        targets = [
            {
                name: mod
                for name, mod in block.named_modules()
                if isinstance(mod, torch.nn.Linear) and plan[f"{i}.{name}"] not in ("fp16", "fp32")
            }
            for i, block in enumerate(runner.blocks)
        ]

        def compress(i: int, name: str, linear: torch.nn.Linear, H: torch.Tensor) -> torch.Tensor:
            n, m = (int(x) for x in plan[f"{i}.{name}"].split("-")[1].split("/")[0].split(":"))
            return compress_weight(linear.weight, PBS2P(n=n, m=m), H)

        records = runner.compress(targets, compress, progress=False)
        del runner
        t_compress = time.perf_counter() - t1
        extra["calibration"] = describe_calibration(args.nsamples, args.calib_seqlen, args.seed, split)
    stored_bits = paper_bits = 0.0
    for k, mod in linears.items():
        w = mod.weight
        if hasattr(w, "packed_nbytes"):
            stored_bits += 8 * w.packed_nbytes()
            paper_bits += w.numel() * w.n / w.m
        else:
            bits = 16 if plan[k] == "fp16" else 8 * w.element_size()
            stored_bits += bits * w.numel()
            paper_bits += bits * w.numel()
    total = sum(numel.values())
    ppl = heldout_perplexity(model, tok, seqlen=args.seqlen, limit=args.limit, progress=False, split=split)
    return {
        **point,
        **extra,
        "settings": settings_of(point, args),
        "bits_per_weight": stored_bits / total,
        "paper_bits_per_weight": paper_bits / total,
        "decoder_linear_weights": total,
        "settings_per_linear": plan,
        "ppl": ppl.ppl,
        "perplexity": {k: v for k, v in ppl.to_dict().items() if k != "window_nll"},
        "window_nll": list(ppl.window_nll),
        "sequential_errors_calib": {f"{r.index}.{name}": err for r in records for name, err in r.errors.items()},
        "wall_s": {
            "compress": round(t_compress, 1),
            "ppl": round(ppl.wall_s, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "load_avg": {"start": load0, "end": os.getloadavg()[0]},
        "torch_threads": torch.get_num_threads(),
    }


def fp_from_file(point: dict, args: argparse.Namespace) -> dict | None:
    """The FP point from a committed ``pbs2p eval`` result holding every window's NLL (same text and seqlen):
    the first ``--limit`` windows give exactly what measuring them again would. ``None`` if it does not fit."""
    path = Path(args.fp_from)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    entry = next((e for e in record["entries"] if e.get("method") == "fp" and e.get("perplexity")), None)
    if entry is None or record["model"]["name"] != args.model or entry["perplexity"]["seqlen"] != args.seqlen:
        return None
    nll = entry["perplexity"]["window_nll"][: args.limit]
    if len(nll) < args.limit:
        return None
    predicted = len(nll) * (args.seqlen - 1)
    ppl = math.exp(math.fsum(nll) / predicted)
    return {
        **point,
        "settings": settings_of(point, args),
        "bits_per_weight": entry["bits_per_weight"],
        "paper_bits_per_weight": entry["bits_per_weight"],
        "settings_per_linear": {},
        "ppl": ppl,
        "perplexity": {
            "ppl": ppl,
            "windows": len(nll),
            "seqlen": args.seqlen,
            "predicted_tokens": predicted,
            "source": f"{path} (window_nll[:{args.limit}])",
            "source_command": record["command"],
        },
        "window_nll": nll,
        "sequential_errors_calib": {},
        "wall_s": {"compress": 0.0, "ppl": 0.0, "total": 0.0},
        "load_avg": None,
    }


def settings_of(point: dict, args: argparse.Namespace) -> dict:
    """What a point's numbers depend on (a stored point with other settings is recomputed)."""
    s = {"model": args.model, "seqlen": args.seqlen, "limit": args.limit}
    if point["kind"] != "fp":
        s |= {"nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen, "seed": args.seed}
    if point["kind"] == "alloc":
        s["layer_errors_digest"] = _digest(args.layer_errors)
    return s


def _digest(path: str | Path) -> str:
    """Digest of the allocator's inputs (the alloc methods' errors and bits), so new layer errors rerun."""
    import hashlib

    entries = json.loads(Path(path).read_text())["entries"]
    chosen = sorted((k, v["err_calib"], v["bits"]) for k, v in entries.items() if v["method"] in ALLOC_METHODS)
    return hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ report
def within_statement(points: Sequence[dict]) -> str:
    """The plain sentence: smallest average bits with perplexity within WITHIN × FP (same windows)."""
    fp = next((p for p in points if p["kind"] == "fp"), None)
    if fp is None:
        return "No FP point measured yet, so no 3× statement."
    bound = WITHIN * fp["ppl"]
    ok = sorted((p for p in points if p["kind"] != "fp" and p["ppl"] <= bound), key=lambda p: p["bits_per_weight"])
    lim = f"held-out windows: {fp['perplexity']['windows']} × {fp['perplexity']['seqlen']} tokens (--limit)"
    if not ok:
        best = min((p for p in points if p["kind"] != "fp"), key=lambda p: p["ppl"], default=None)
        tail = (
            f"; the best compressed point is {best['name']} at {best['bits_per_weight']:.3f} bits, ppl "
            f"{best['ppl']:,.1f}"
            if best
            else ""
        )
        return (
            f"**No measured compressed point is within {WITHIN:g}× of FP** (FP ppl {fp['ppl']:.2f}, bound "
            f"{bound:.2f}; {lim}){tail}."
        )
    p = ok[0]
    cheaper = [q for q in points if q["kind"] != "fp" and q["bits_per_weight"] < p["bits_per_weight"]]
    below = max(cheaper, key=lambda q: q["bits_per_weight"], default=None)
    tail = (
        f" The next cheaper point measured, `{below['name']}` at {below['bits_per_weight']:.3f} bits, has ppl "
        f"{below['ppl']:,.2f} ({below['ppl'] / fp['ppl']:.2f}× FP): the threshold lies between the two."
        if below
        else ""
    )
    return (
        f"**The smallest average bits whose perplexity is within {WITHIN:g}× of FP: {p['bits_per_weight']:.3f} "
        f"bits per decoder-linear weight** (point `{p['name']}`, ppl {p['ppl']:.2f} vs FP {fp['ppl']:.2f}, "
        f"bound {bound:.2f}; {lim}).{tail}"
    )


def table(points: Sequence[dict]) -> str:
    fp = next((p for p in points if p["kind"] == "fp"), None)
    head = [
        "point",
        "kind",
        "bits/w (honest)",
        "bits/w (paper)",
        "ppl",
        "× FP",
        "layers fp16",
        "N:M mix",
        "slack bits/w",
        "compress s",
        "ppl s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(points, key=lambda p: p["bits_per_weight"]):
        counts = Counter(p["settings_per_linear"].values())
        mix = ", ".join(f"{k.split('-')[1].split('/')[0]}: {v}" for k, v in sorted(counts.items()) if "spbo" in k)
        slack = p.get("allocation", {}).get("slack_per_weight")
        ratio = f"{p['ppl'] / fp['ppl']:,.2f}" if fp else "–"
        lines.append(
            f"| {p['name']} | {p['kind']} | {p['bits_per_weight']:.3f} | {p['paper_bits_per_weight']:.3f} | "
            f"{p['ppl']:,.2f} | {ratio} | {counts.get('fp16', 0)} | {mix or '–'} | "
            f"{'–' if slack is None else f'{slack:.2e}'} | {p['wall_s']['compress']:.0f} | "
            f"{p['wall_s']['ppl']:.0f} |"
        )
    return "\n".join(lines)


def plot(points: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    style = {
        "uniform": ("o", "PBS²P uniform N:M"),
        "alloc": ("s", "allocated (budget)"),
        "fp": ("*", "FP32"),
        "fp16": ("D", "FP16"),
    }
    for kind, (marker, label) in style.items():
        mine = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["bits_per_weight"])
        if mine:
            ax.plot(
                [p["bits_per_weight"] for p in mine],
                [p["ppl"] for p in mine],
                marker=marker,
                linestyle="-" if kind == "alloc" else "none",
                label=label,
            )
            for p in mine:
                ax.annotate(
                    p["name"], (p["bits_per_weight"], p["ppl"]), textcoords="offset points", xytext=(4, 3), fontsize=7
                )
    fp = next((p for p in points if p["kind"] == "fp"), None)
    if fp:
        ax.axhline(WITHIN * fp["ppl"], color="grey", linestyle="--", linewidth=0.8, label=f"{WITHIN:g}× FP")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("honest bits per decoder-linear weight (every stored bit)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fp_all_windows(points: Sequence[dict]) -> str:
    """``"; FP over all N windows: P"`` when the FP point came from a full evaluation file."""
    fp = next((p for p in points if p["kind"] == "fp" and "source" in p["perplexity"]), None)
    if fp is None:
        return ""
    path = Path(fp["perplexity"]["source"].split(" (")[0])
    if not path.exists():
        return ""
    entry = next(e for e in json.loads(path.read_text())["entries"] if e.get("method") == "fp")
    return f"; FP over all {entry['perplexity']['windows']} windows: {entry['perplexity']['ppl']:.2f}, `{path}`"


def write_readme(points: Sequence[dict], out: Path, runs: Sequence[dict]) -> Path:
    any_p = next(iter(points))
    s = any_p["settings"]
    cal = next((p["settings"] for p in points if "nsamples" in p["settings"]), None)
    lines = [
        f"# Perplexity vs honest bits — {s['model']}",
        "",
        within_statement(points),
        "",
        f"Held-out perplexity on the first {s['limit']} windows of {s['seqlen']} tokens of the held-out Wikipedia "
        f"text (`--limit`{_fp_all_windows(points)}). Compression: SequentialRunner block by block on "
        + (f"{cal['nsamples']} × {cal['calib_seqlen']} calibration tokens (seed {cal['seed']})" if cal else "–")
        + ". Bits: every stored bit of the decoder linears over their weights (packed signs + kept-set index + "
        'fp32 α, μ; fp16 layers at 16); "paper" = 1 bit per kept weight. Allocated points choose per linear '
        "among " + ", ".join(f"`{m}`" for m in ALLOC_METHODS) + " to minimise the summed calibration-text relative "
        "output error from `benchmarks/results/layer_error/layer_error.json` (isolation), with the average bits "
        "≤ the budget (exactly optimal over that set; slack in the table).",
        "",
        table(points),
        "",
        "![ppl vs bits](ppl_vs_bits.png)",
        "",
    ]
    subs = sorted(d.name for d in out.iterdir() if d.is_dir() and (d / "README.md").exists())
    if subs:  # other settings of the same command (e.g. more perplexity windows), each with its own README
        lines += ["Same command with other settings: " + ", ".join(f"[{d}]({d}/README.md)" for d in subs), ""]
    lines += [
        "## Runs",
        "",
        "| command | points computed | wall s | load avg (start → end) |",
        "|---|---|---|---|",
    ]
    for r in runs:
        note = "" if r.get("finished", True) else " (interrupted)"
        lines.append(
            f"| `{r['command'].strip()}`{note} | {', '.join(r['computed']) or '–'} | {r['wall_s']:.0f} | "
            f"{r['load_start']:.1f} → {r['load_end']:.1f} |"
        )
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.pareto",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--points", default=DEFAULT_POINTS, help=f"comma-separated (default {DEFAULT_POINTS})")
    ap.add_argument("--limit", type=int, default=16, help="held-out perplexity windows (default 16)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nsamples", type=int, default=4, help="calibration segments (default 4)")
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--layer-errors", default=str(LAYER_ERRORS))
    ap.add_argument(
        "--fp-from",
        default=str(FP_RESULT),
        help="committed FP eval JSON with per-window NLLs to take the fp point from ('' = measure)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two OpenMP threads spin-wait "
        "and ran 6x slower; 0 = torch's default)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--max-minutes", type=float, default=0, help="start no new point after this (0 = no limit)")
    ap.add_argument("--report-only", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.out / "points"
    folder.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    computed: list[str] = []
    command = ("python -m benchmarks.pareto " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    run = {
        "command": command,
        "computed": computed,
        "wall_s": 0.0,
        "load_start": load0,
        "load_end": load0,
        "finished": False,
    }

    def save_run() -> None:  # kept current after every point, so an interrupted run is accounted for
        run.update(wall_s=round(time.perf_counter() - t0, 1), load_end=os.getloadavg()[0])
        runs_path.write_text(json.dumps(runs, indent=1) + "\n")

    if not args.report_only:
        runs.append(run)
        for spec in [p.strip() for p in args.points.split(",") if p.strip()]:
            point = parse_point(spec)
            path = folder / f"{point['name']}.json"
            if path.exists() and json.loads(path.read_text())["settings"] == settings_of(point, args):
                continue
            if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes:
                print(f"--max-minutes reached; {spec} and later points left for the next run", flush=True)
                break
            print(f"point {spec}: computing (load {os.getloadavg()[0]:.1f})", flush=True)
            try:
                record = run_point(point, args)
            except ValueError as exc:  # e.g. a budget below the cheapest allocation
                print(f"point {spec}: skipped: {exc}", flush=True)
                continue
            path.write_text(json.dumps(record, indent=1) + "\n")
            computed.append(point["name"])
            save_run()
            print(
                f"point {spec}: {record['bits_per_weight']:.3f} bits, ppl {record['ppl']:,.2f} "
                f"({record['wall_s']['total']:.0f} s)",
                flush=True,
            )
        run["finished"] = True
        save_run()
    stored = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    points = [p for p in stored if p["settings"] == settings_of(p, args)]  # only this run's settings
    if len(points) < len(stored):
        print(f"{len(stored) - len(points)} stored point(s) with other settings are left out of the report")
    if not points:
        print("no points yet")
        return 0
    plot(points, args.out / "ppl_vs_bits.png")
    readme = write_readme(points, args.out, runs)
    print(table(points))
    print()
    print(within_statement(points))
    print(f"\nwrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
