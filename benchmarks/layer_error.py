"""Per-layer relative output error ‖(W − Ŵ)X‖_F / ‖WX‖_F of every compression method on real activations.

Every linear of the selected decoder layers is compressed by every selected method with the Hessian of its
inputs on **calibration** text, and scored on the Hessian of its inputs on **held-out** text (other
articles: :mod:`benchmarks.activations`). Each linear is measured **in isolation**: its inputs are those
of the uncompressed model, so all methods see exactly the same inputs and the numbers compare methods
layer by layer (the sequential pipeline's compounding is what ``benchmarks/pareto.py`` measures).

Methods (``--methods``; keys ``<method>[-N:M]/<compensation>``):

* ``binarize/{block,column}`` — binarization without pruning (PBS²P's binarizer, sweep and refit);
* ``billm/block-diag`` — BiLLM-style; ``stbllm-N:M/block-diag`` — STBLLM-style (block-only by design);
* ``oneshot-N:M/{block,column}`` — prune to N:M once (OBS), then binarize;
* ``spbo-N:M/{block,column}`` — PBS²P with SPBO (the library default is ``spbo-N:M/column``);
* ``fp16`` — the weight stored in float16 (the "left dense" option of the bit allocator).

``block`` = compensation only across 128-column blocks, ``column`` = column by column inside each block
(GPTQ/SparseGPT). Bits are honest (every stored bit: signs, kept-set index, bitmaps, fp32 scales).
Groups for ``--methods``: ``all``, ``claim`` (binarize, one-shot and SPBO at 6:8), ``alloc`` (what
``benchmarks/pareto.py`` allocates from: ``spbo-*/column`` and ``fp16``), or substrings of keys.

Resumable: results accumulate in ``layer_error.json`` (one entry per method × linear; computed entries
are skipped), captured Hessians are cached under ``runs/layer_error/``. Each run rewrites ``README.md``
(summary tables, the paper's claim) and ``heatmaps/*.png`` from everything accumulated.

    python -m benchmarks.layer_error                                   # default size, ≈ 15 min on 2 cores
    python -m benchmarks.layer_error --layers all --methods claim,alloc
    python -m benchmarks.layer_error --model tiny --n-cal 2 --n-eval 2 --seqlen 64 --out /tmp/le
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files
if __package__ in (None, ""):  # run as a file: make `benchmarks` and `pbs2p` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.activations import capture_hessians, decoder_linears, linear_type, token_sets  # noqa: E402
from pbs2p.algorithms import relative_output_error  # noqa: E402
from pbs2p_lab.baselines import binarize_dense, pbs2p  # noqa: E402
from pbs2p_lab.billm import billm, stbllm  # noqa: E402

TYPES = ("q", "k", "v", "o", "gate", "up", "down")
PATTERNS = ((6, 8), (5, 8), (4, 8), (2, 4))
DEFAULT_LAYERS = "0,9,19,28"
RESULTS = Path("benchmarks/results/layer_error")
SCHEMA = "pbs2p-layer-error-v1"

# (W, H_cal) -> (W_hat, honest bits/weight, paper bits/weight)
Compressor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float, float]]


@dataclass(frozen=True)
class Method:
    """One column of the comparison."""

    key: str
    family: str  # binarize, billm, stbllm, oneshot, spbo, fp16
    nm: str | None
    compensation: str | None
    run: Compressor


def _baseline(fn: Callable) -> Compressor:
    def run(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        r = fn(W, H)
        return r.W_hat, r.bits_per_weight, r.paper_bits

    return run


def method_grid(patterns: Sequence[tuple[int, int]] = PATTERNS) -> dict[str, Method]:
    """Every method × option of the comparison, by key (see the module docstring)."""
    grid: list[Method] = []
    for comp in ("block", "column"):
        grid.append(
            Method(
                f"binarize/{comp}",
                "binarize",
                None,
                comp,
                _baseline(lambda W, H, c=comp: binarize_dense(W, H, compensation=c)),
            )
        )
    grid.append(Method("billm/block-diag", "billm", None, "block-diag", _baseline(billm)))
    for n, m in patterns:
        grid.append(
            Method(
                f"stbllm-{n}:{m}/block-diag",
                "stbllm",
                f"{n}:{m}",
                "block-diag",
                _baseline(lambda W, H, n=n, m=m: stbllm(W, H, n, m)),
            )
        )
    for family in ("oneshot", "spbo"):
        for n, m in patterns:
            for comp in ("block", "column"):
                grid.append(
                    Method(
                        f"{family}-{n}:{m}/{comp}",
                        family,
                        f"{n}:{m}",
                        comp,
                        _baseline(lambda W, H, n=n, m=m, f=family, c=comp: pbs2p(
                            W, H, n, m, spbo_steps=0 if f == "oneshot" else None, compensation=c)),
                    )
                )
    grid.append(Method("fp16", "fp16", None, None, lambda W, H: (W.half().float(), 16.0, 16.0)))
    return {meth.key: meth for meth in grid}


def select_methods(spec: str, grid: dict[str, Method]) -> list[Method]:
    """``all``, ``claim``, ``alloc`` or substrings of keys, comma-separated, in grid order."""
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    groups = {
        "all": lambda k: True,
        "claim": lambda k: k.startswith(("binarize/", "oneshot-6:8/", "spbo-6:8/")),
        "alloc": lambda k: (k.startswith("spbo-") and k.endswith("/column")) or k == "fp16",
    }
    chosen = [m for k, m in grid.items() if any(groups[t](k) if t in groups else t in k for t in tokens)]
    if not chosen:
        raise SystemExit(f"--methods {spec!r} selects nothing; keys: {', '.join(grid)}")
    return chosen


def parse_layers(spec: str, count: int) -> list[int]:
    """``all`` or comma-separated indices (negative counts from the end)."""
    if spec == "all":
        return list(range(count))
    out = []
    for tok in spec.split(","):
        i = int(tok)
        i = i + count if i < 0 else i
        if not 0 <= i < count:
            raise SystemExit(f"--layers: {tok} is outside 0..{count - 1}")
        out.append(i)
    return sorted(set(out))


# --------------------------------------------------------------------------------------------- activations
def activations(model, tokenizer, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """``(H_cal, H_eval, token record)``, from the cache when the same sizes were captured before."""
    from pbs2p_lab.data.split import load_split

    tag = f"{args.model_name}-cal{args.n_cal}-eval{args.n_eval}-seq{args.seqlen}-seed{args.seed}"
    cache = Path(args.cache) / f"{tag}.pt" if args.cache else None
    if cache is not None and cache.exists():
        data = torch.load(cache, weights_only=True)
        print(f"activations: loaded {cache}", flush=True)
        return data["cal"], data["eval"], json.loads(data["record"])
    sets = token_sets(tokenizer, load_split(), n_cal=args.n_cal, n_eval=args.n_eval, seqlen=args.seqlen, seed=args.seed)
    t0 = time.perf_counter()
    h_cal = capture_hessians(model, sets.calibration, args.batch_size)
    h_eval = capture_hessians(model, sets.heldout, args.batch_size)
    record = {**sets.record, "capture_s": round(time.perf_counter() - t0, 1)}
    print(f"activations: captured in {record['capture_s']} s; shared {record['shared_ngrams']}", flush=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"cal": h_cal, "eval": h_eval, "record": json.dumps(record)}, cache)
    return h_cal, h_eval, record


# --------------------------------------------------------------------------------------------- measuring
def measure(
    model,
    h_cal: dict,
    h_eval: dict,
    layers: list[int],
    methods: list[Method],
    store: dict,
    save: Callable[[int], None],
    redo: bool = False,
) -> int:
    """Fill ``store["entries"]`` with every missing (method, linear) of ``layers`` (all of them with
    ``redo``); ``save(done)`` is called after each layer. Returns how many entries were computed."""
    entries = store["entries"]
    done = 0
    for i, name, lin in decoder_linears(model):
        if i not in layers:
            continue
        W = lin.weight.detach().float()
        key = f"{i}.{name}"
        for meth in methods:
            ek = f"{meth.key}|{key}"
            if ek in entries and not redo:
                continue
            t0 = time.perf_counter()
            W_hat, bits, paper = meth.run(W, h_cal[key])
            entries[ek] = {
                "method": meth.key,
                "family": meth.family,
                "nm": meth.nm,
                "compensation": meth.compensation,
                "layer": i,
                "linear": name,
                "type": linear_type(name),
                "shape": list(W.shape),
                "err_heldout": relative_output_error(W, W_hat, h_eval[key]),
                "err_calib": relative_output_error(W, W_hat, h_cal[key]),
                "bits": bits,
                "paper_bits": paper,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            done += 1
        if name.endswith("down_proj"):
            print(f"layer {i} done ({done} new entries, load {os.getloadavg()[0]:.1f})", flush=True)
            save(done)
    return done


# --------------------------------------------------------------------------------------------- reporting
def claim(entries: Sequence[dict]) -> list[dict]:
    """For each compensation: on how many linears SPBO / one-shot 6:8 beat binarization without pruning."""
    by = {(e["method"], e["layer"], e["linear"]): e["err_heldout"] for e in entries}

    def bits(method: str) -> float:  # honest bits/weight over the linears measured, weighted by their size
        mine = [(e["shape"][0] * e["shape"][1], e["bits"]) for e in entries if e["method"] == method]
        return sum(w * b for w, b in mine) / sum(w for w, _ in mine)

    rows = []
    for comp in ("column", "block"):
        for family in ("spbo", "oneshot"):
            pairs = [
                (v, by[(f"binarize/{comp}", li, nm)])
                for (k, li, nm), v in by.items()
                if k == f"{family}-6:8/{comp}" and (f"binarize/{comp}", li, nm) in by
            ]
            if not pairs:
                continue
            wins = sum(a < b for a, b in pairs)
            rows.append(
                {
                    "method": f"{family}-6:8/{comp}",
                    "baseline": f"binarize/{comp}",
                    "wins": wins,
                    "linears": len(pairs),
                    "fraction": wins / len(pairs),
                    "median_ratio": statistics.median(a / b for a, b in pairs if b > 0),
                    "bits": bits(f"{family}-6:8/{comp}"),
                    "baseline_bits": bits(f"binarize/{comp}"),
                }
            )
    return rows


def _num(x: float) -> str:
    return f"{x:.3f}" if x >= 0.01 or x == 0 else f"{x:.1e}"


def _cell(vals: list[float]) -> str:
    return f"{_num(statistics.median(vals))} / {_num(max(vals))}" if vals else "–"


def coverage(entries: Sequence[dict], order: Sequence[str]) -> tuple[set, set]:
    """``(linears every method measured, linears of the best-covered methods)`` as ``(layer, name)`` sets."""
    per = {k: {(e["layer"], e["linear"]) for e in entries if e["method"] == k} for k in order}
    common = set.intersection(*per.values()) if per else set()
    widest = max(per.values(), key=len) if per else set()
    return common, widest


def summary_table(entries: Sequence[dict], order: Sequence[str], linears: set | None = None) -> str:
    """Median / worst held-out relative output error per method and linear type, with honest bits
    (over ``linears`` only, if given; methods that did not measure all of them are left out)."""
    head = ["method", "linears", "bits (honest)", "bits (paper)", *TYPES, "all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in order:
        mine = [e for e in entries if e["method"] == key and (linears is None or (e["layer"], e["linear"]) in linears)]
        if linears is not None and len(mine) < len(linears):
            continue
        if not mine:
            continue
        weights = [e["shape"][0] * e["shape"][1] for e in mine]
        bits = sum(w * e["bits"] for w, e in zip(weights, mine, strict=True)) / sum(weights)
        paper = sum(w * e["paper_bits"] for w, e in zip(weights, mine, strict=True)) / sum(weights)
        cells = [_cell([e["err_heldout"] for e in mine if e["type"] == t]) for t in TYPES]
        lines.append(
            f"| {key} | {len(mine)} | {bits:.3f} | {paper:.3f} | "
            + " | ".join(cells)
            + f" | {_cell([e['err_heldout'] for e in mine])} |"
        )
    return "\n".join(lines)


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def heatmaps(entries: Sequence[dict], order: Sequence[str], n_layers: int, folder: Path) -> list[Path]:
    """One PNG per method: layer × linear type, colour = held-out relative output error (shared log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    vals = [e["err_heldout"] for e in entries if e["err_heldout"] > 0 and e["method"] != "fp16"]
    if not vals:
        return []
    norm = LogNorm(vmin=max(min(vals), 1e-3), vmax=max(max(vals), 2e-3))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in order:
        mine = [e for e in entries if e["method"] == key]
        if not mine or key == "fp16":
            continue
        grid = torch.full((n_layers, len(TYPES)), math.nan)
        for e in mine:
            grid[e["layer"], TYPES.index(e["type"])] = e["err_heldout"]
        fig, ax = plt.subplots(figsize=(3.6, 1.2 + 0.16 * n_layers))
        im = ax.imshow(grid.numpy(), aspect="auto", norm=norm, cmap="magma_r", interpolation="nearest")
        ax.set_xticks(range(len(TYPES)), TYPES, fontsize=7)
        ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
        ax.set_ylabel("decoder layer", fontsize=7)
        ax.set_title(f"{key}\n‖(W−Ŵ)X‖/‖WX‖, held-out", fontsize=7)
        cb = fig.colorbar(im, ax=ax, fraction=0.08)
        cb.ax.tick_params(labelsize=6)
        fig.tight_layout()
        path = folder / f"{_safe(key)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_readme(store: dict, out: Path, order: Sequence[str], plots: Sequence[Path]) -> Path:
    """``README.md``: how the numbers were made, the paper's claim, the summary table, the heat maps."""
    entries = list(store["entries"].values())
    act = store["activations"]
    common, widest = coverage(entries, order)
    lines = [
        f"# Per-layer output error on real activations — {store['model']['name']}",
        "",
        "Relative output error ‖(W−Ŵ)X‖_F / ‖WX‖_F of each decoder linear, **measured in isolation**: every",
        "linear is compressed with the Hessian of its inputs in the *uncompressed* model on calibration text and",
        "scored on its inputs on held-out text (other Wikipedia articles; no token window shared:",
        f"{act['shared_ngrams']['count']} shared {act['shared_ngrams']['n']}-token sequences). Calibration: "
        f"{act['calibration']['windows']} × {act['calibration']['seqlen']} tokens; held-out: "
        f"{act['heldout']['windows']} × {act['heldout']['seqlen']} tokens; seed {act['calibration']['seed']}.",
        'Bits are honest (every stored bit over the number of weights, fp32 scales); "paper" bits count only',
        "weight bits (the peers' convention). `block` = compensation across 128-column blocks only, `column` =",
        "column by column inside blocks; BiLLM/STBLLM use their own block-only update (`block-diag`).",
        "",
        "## The paper's claim: pruning + binarization beats binarization alone",
        "",
        "Fraction of linears where the method at 6:8 has a **lower** held-out output error than binarization",
        "without pruning (same compensation, same inputs):",
        "",
        "| method | vs | lower error on | fraction | median error ratio | honest bits (method vs baseline) |",
        "|---|---|---|---|---|---|",
    ]
    for r in claim(entries):
        lines.append(
            f"| {r['method']} | {r['baseline']} | {r['wins']} / {r['linears']} | {r['fraction']:.1%} "
            f"| {r['median_ratio']:.3f} | {r['bits']:.3f} vs {r['baseline_bits']:.3f} |"
        )
    lines += [
        "",
        "Not an iso-bit comparison: counted honestly, 6:8 stores a kept-set index per group of 8 (5 bits) plus 6",
        "signs, i.e. more than the 8 signs of unpruned binarization; the paper's 0.75 vs 1 bit counts signs only.",
        "",
        "## Median / worst error per method and linear type",
        "",
        "Each cell: median / worst held-out relative output error over the linears measured.",
        "",
        f"**Every method on the same {len(common)} linears** (layers "
        f"{', '.join(str(i) for i in sorted({li for li, _ in common}))}):",
        "",
        summary_table(entries, order, common),
        "",
    ]
    if len(widest) > len(common):
        lines += [
            f"**The methods measured on all {len(widest)} linears** (every layer):",
            "",
            summary_table(entries, order, widest),
            "",
        ]
    lines += [
        "## Runs (every number above comes from these commands; results accumulate in `layer_error.json`)",
        "",
        "| command | layers | new entries | wall s | load avg (start → end) |",
        "|---|---|---|---|---|",
    ]
    for run in store["runs"]:
        note = "" if run.get("finished", True) else " (interrupted)"
        lines.append(
            f"| `{run['command'].strip()}`{note} | {run['layers']} | {run['new_entries']} | {run['wall_s']:.0f} | "
            f"{run['load_start']:.1f} → {run['load_end']:.1f} |"
        )
    if plots:
        lines += ["", "## Heat maps (layer × linear type; shared log colour scale; blank = not measured)", ""]
        lines += [f"![{p.stem}](heatmaps/{p.name})" for p in plots]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.layer_error",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2", help="built-in alias (smollm2, tiny) or a local HF folder")
    ap.add_argument("--layers", default=DEFAULT_LAYERS, help=f"'all' or indices (default {DEFAULT_LAYERS})")
    ap.add_argument("--methods", default="all", help="all, claim, alloc, or key substrings (comma-separated)")
    ap.add_argument("--patterns", default="6:8,5:8,4:8,2:4", help="N:M patterns of the grid")
    ap.add_argument("--n-cal", type=int, default=4, help="calibration windows (H for compression)")
    ap.add_argument("--n-eval", type=int, default=2, help="held-out windows (H for scoring)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two OpenMP threads spin-wait "
        "and ran 6x slower; 0 = torch's default)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {RESULTS} for smollm2, runs/layer_error/<model> otherwise)",
    )
    ap.add_argument("--cache", default="runs/layer_error", help="Hessian cache folder ('' = no cache)")
    ap.add_argument("--redo", action="store_true", help="recompute the selected entries even if present")
    ap.add_argument("--report-only", action="store_true", help="rewrite README/plots from the JSON, compute nothing")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model_name = Path(args.model).name
    out = args.out or (RESULTS if args.model == "smollm2" else Path("runs/layer_error") / args.model_name)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "layer_error.json"
    patterns = [tuple(int(x) for x in p.split(":")) for p in args.patterns.split(",") if p]
    grid = method_grid(patterns)
    settings = {"n_cal": args.n_cal, "n_eval": args.n_eval, "seqlen": args.seqlen, "seed": args.seed}
    store = json.loads(json_path.read_text()) if json_path.exists() else None
    if store is not None and (
        store.get("schema") != SCHEMA or store["settings"] != settings or store["model"]["name"] != args.model_name
    ):
        raise SystemExit(
            f"{json_path} holds results for other settings ({store.get('settings')}); use another --out or delete it"
        )
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    from pbs2p_lab.assets import load_model
    from pbs2p_lab.eval.results import result_header

    model, tokenizer = load_model(args.model)
    n_layers = len({i for i, _, _ in decoder_linears(model)})
    command = ("python -m benchmarks.layer_error " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    if store is None:
        store = {
            "schema": SCHEMA,
            **{k: v for k, v in result_header(command).items() if k != "schema"},
            "model": {"name": args.model_name, "decoder_layers": n_layers},
            "settings": settings,
            "measurement": "isolation: each linear on the inputs of the uncompressed model",
            "activations": None,
            "runs": [],
            "entries": {},
        }

    run = {
        "command": command,
        "layers": args.layers,
        "methods": args.methods,
        "new_entries": 0,
        "wall_s": 0.0,
        "load_start": load_start,
        "load_end": load_start,
        "torch_threads": torch.get_num_threads(),
        "finished": False,
    }

    def save(done: int) -> None:  # the run's record is kept current, so an interrupted run is accounted for
        run.update(new_entries=done, wall_s=round(time.perf_counter() - t_start, 1), load_end=os.getloadavg()[0])
        json_path.write_text(json.dumps(store, indent=1) + "\n")

    new = 0
    if not args.report_only:
        layers = parse_layers(args.layers, n_layers)
        methods = select_methods(args.methods, grid)
        store["runs"].append(run)
        with torch.no_grad():
            h_cal, h_eval, record = activations(model, tokenizer, args)
            store["activations"] = record
            new = measure(model, h_cal, h_eval, layers, methods, store, save, redo=args.redo)
        run["finished"] = True
        save(new)
    order = [k for k in grid if any(e["method"] == k for e in store["entries"].values())]
    entries = list(store["entries"].values())
    plots = heatmaps(entries, order, n_layers, out / "heatmaps")
    readme = write_readme(store, out, order, plots)
    common, widest = coverage(entries, order)
    print(summary_table(entries, order, common))
    if len(widest) > len(common):
        print()
        print(summary_table(entries, order, widest))
    print()
    for r in claim(entries):
        print(
            f"{r['method']} < {r['baseline']}: {r['wins']}/{r['linears']} linears ({r['fraction']:.1%}), "
            f"median ratio {r['median_ratio']:.3f}"
        )
    print(
        f"\nwrote {json_path}, {readme}, {len(plots)} heat maps ({new} new entries, "
        f"{time.perf_counter() - t_start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
