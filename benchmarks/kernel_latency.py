"""Latency of ``F.linear`` on packed 1-bit N:M weights against dense weights and torchao int8.

Run ``python benchmarks/kernel_latency.py`` (about 5 minutes on 2 cores). For every weight shape
(out x in), batch size and activation dtype it times, in one process and alternating call by call,
dense ``F.linear``, ``pbs2p.kernels.ops.bsp_linear`` on 4:8 and 2:4 packed weights (random masks and
signs, packed with ``pbs2p.kernels.packing.pack``) and torchao's ``Int8WeightOnlyConfig``; it prints a
markdown table of medians [min-max], speedups over dense in the same dtype and the path each packed product
took (``pbs2p.kernels.ops.native_path``), and writes
``kernel_latency.{json,md,png}`` into ``benchmarks/results/kernels/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pbs2p.kernels import ops, packing  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (1536, 576), (576, 1536)]
BATCHES = [1, 8, 128]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATTERNS = [(4, 8), (2, 4)]
RESULTS = Path(__file__).parent / "results" / "kernels"


def packed_weight(out: int, k: int, n: int, m: int, dtype: torch.dtype, seed: int = 0):
    """Codes of a random N:M mask and signs, with per-row alpha > 0 and mu in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(out, k // m, m, generator=g).topk(n, -1).indices
    mask = torch.zeros(out, k // m, m, dtype=torch.bool).scatter_(-1, top, True).reshape(out, k)
    codes = packing.pack(mask, torch.rand(out, k, generator=g) > 0.5, n, m)
    alpha = (0.02 * torch.rand(out, 1, generator=g) + 0.01).to(dtype)
    mu = (0.002 * torch.randn(out, 1, generator=g)).to(dtype)
    return codes, alpha, mu


def int8_linear(weight: torch.Tensor) -> torch.nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    quantize_(linear, Int8WeightOnlyConfig())
    return linear


def time_alternating(fns: dict[str, Callable[[], object]], budget_s: float, max_reps: int) -> dict[str, list[float]]:
    """Seconds per call of every function, sampled in turn (random order each round) until the budget is spent."""
    for fn in fns.values():  # warm up
        fn()
    once = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        once[name] = time.perf_counter() - start
    # One call per sample (so each call follows another method, with its cold caches), except for
    # calls too short to time alone: samples of >= ~0.2 ms.
    inner = min(200, max(1, int(2e-4 / max(min(once.values()), 1e-7))))
    reps = int(budget_s / max(sum(once.values()) * inner, 1e-9))
    reps = max(5, min(max_reps, reps))
    names = list(fns)
    shuffle = random.Random(0)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _round in range(reps):
        order = names[:]
        shuffle.shuffle(order)  # each method follows every other one, not always the same
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def run(shapes: list[tuple[int, int]], batches: list[int], budget_s: float, max_reps: int) -> list[dict]:
    rows = []
    for out, k in shapes:
        for dname, dtype in DTYPES.items():
            weight = torch.randn(out, k, dtype=dtype) / k**0.5
            packed = {f"packed {n}:{m}": (packed_weight(out, k, n, m, dtype), n, m) for n, m in PATTERNS}
            int8 = int8_linear(weight)
            for batch in batches:
                x = torch.randn(batch, k, dtype=dtype)
                fns: dict[str, Callable[[], object]] = {"dense": lambda x=x, w=weight: F.linear(x, w)}
                for name, ((codes, alpha, mu), n, m) in packed.items():
                    fns[name] = lambda x=x, c=codes, a=alpha, u=mu, n=n, m=m, k=k: ops.bsp_linear(
                        x, c, a, u, None, n, m, k
                    )
                fns["torchao int8-wo"] = lambda x=x, lin=int8: lin(x)
                with torch.inference_mode():
                    samples = time_alternating(fns, budget_s, max_reps)
                dense = statistics.median(samples["dense"])
                paths = {name: ops.native_path(dtype, batch, n, m, k, k) for name, (_, n, m) in packed.items()}
                for name, s in samples.items():
                    med = statistics.median(s)
                    rows.append(
                        {
                            "out": out,
                            "in": k,
                            "batch": batch,
                            "dtype": dname,
                            "method": name,
                            "median_ms": med * 1e3,
                            "min_ms": min(s) * 1e3,
                            "max_ms": max(s) * 1e3,
                            "speedup_vs_dense": dense / med,
                            "samples": len(s),
                            "path": paths.get(name),
                        }
                    )
                print(
                    f"  {out}x{k} batch {batch} {dname}: "
                    + ", ".join(f"{r['method']} {r['median_ms']:.3f} ms" for r in rows[-len(samples) :]),
                    flush=True,
                )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        f"Backend: `{meta['backend']}`, {meta['threads']} threads, {meta['cpu']}, torch {meta['torch']}, "
        f"{meta['date']} (load average {meta['load_before']} before, {meta['load_after']} after).",
        "",
        "Median ms per call [min-max]; (x) = speedup over dense F.linear in the same dtype, measured "
        "alternating in one process; then the packed product's path (`pbs2p.kernels.ops.native_path`): tables "
        "(lookup tables), pairs (bf16 dot products on the kept weights), blas (W_hat expanded, then the BLAS).",
        "",
        "| out x in | batch | act | " + " | ".join(methods) + " |",
        "|---|---:|---|" + "---:|" * len(methods),
    ]
    keys = list(dict.fromkeys((r["out"], r["in"], r["batch"], r["dtype"]) for r in rows))
    for key in keys:
        cells = []
        for method in methods:
            r = next(r for r in rows if (r["out"], r["in"], r["batch"], r["dtype"]) == key and r["method"] == method)
            cell = f"{r['median_ms']:.3f} [{r['min_ms']:.3f}-{r['max_ms']:.3f}]"
            if method != "dense":
                cell += f" ({r['speedup_vs_dense']:.2f}x)"
            if r.get("path"):
                cell += f" {r['path']}"
            cells.append(cell)
        lines.append(f"| {key[0]}x{key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    shapes = list(dict.fromkeys((r["out"], r["in"]) for r in rows))
    fig, axes = plt.subplots(len(dtypes), len(batches), figsize=(5 * len(batches), 3.6 * len(dtypes)), squeeze=False)
    width = 0.8 / len(methods)
    for i, dtype in enumerate(dtypes):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                values = [
                    next(
                        r["speedup_vs_dense"]
                        for r in rows
                        if (r["out"], r["in"]) == s
                        and r["batch"] == batch
                        and r["dtype"] == dtype
                        and r["method"] == method
                    )
                    for s in shapes
                ]
                ax.bar([x + k * width for x in range(len(shapes))], values, width, label=method)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
            ax.set_xticklabels([f"{o}x{k}" for o, k in shapes], rotation=30, fontsize=7)
            ax.set_title(f"{dtype} activations, batch {batch}", fontsize=9)
            ax.set_ylabel("speedup over dense F.linear")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(methods), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, short budget")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of sampling per configuration")
    parser.add_argument("--max-reps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; outputs get a _t<N> suffix")
    parser.add_argument("--shapes", default=None, help="comma-separated OUTxIN, e.g. 4096x4096,11008x4096")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 1,128")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[3:] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES
    backend = ops.kernel_backend()
    print(f"pbs2p kernel backend: {backend} ({torch.get_num_threads()} threads)", flush=True)
    meta = {
        "backend": backend,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_before": round(os.getloadavg()[0], 2),
    }
    rows = run(shapes, batches, args.budget * (0.3 if args.quick else 1), args.max_reps)
    meta["load_after"] = round(os.getloadavg()[0], 2)
    table = markdown(rows, meta)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / ("kernel_latency" + (f"_t{args.threads}" if args.threads else "") + args.tag)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
