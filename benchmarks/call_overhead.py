"""What a call of the packed linear costs under ``torch.no_grad()`` and under ``torch.inference_mode()``.

    python benchmarks/call_overhead.py [--threads 2] [--rounds 7]

The operator's autograd formula is registered from Python (``torch.library.register_autograd``), so every call
made with autograd enabled in the dispatcher, ``no_grad`` included, passes through a Python wrapper first;
``inference_mode`` skips it. Times, on a 4:8 packed weight at batch 1 (a 64 x 8 weight, where the call is nearly all
overhead, and SmolLM2's 576 x 576), ``F.linear`` (an eager model's call) and the operator
``torch.ops.pbs2p.bsp_linear`` (what a compiled graph calls) in both modes: the modes take turns, ``--rounds``
rounds of 2,000 calls each, and the median per call is reported.
Writes ``benchmarks/results/kernels/call_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402

from pbs2p import PBS2P, compress_weight  # noqa: E402
from pbs2p.kernels.ops import kernel_backend  # noqa: E402

OUT = Path(__file__).parent / "results" / "kernels"
SHAPES = [(64, 8), (576, 576)]
MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
CALLS = 2000


def per_call_us(call, mode: str) -> float:  # noqa: ANN001
    with MODES[mode]():
        for _ in range(CALLS // 10):
            call()
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel_backend()  # builds or loads the native operator
    rows = []
    for out, k in SHAPES:
        w = compress_weight(torch.randn(out, k, generator=torch.Generator().manual_seed(0)), PBS2P(n=4, m=8))
        x = torch.randn(1, k)
        calls = {"F.linear": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                 "operator": lambda x=x, w=w: torch.ops.pbs2p.bsp_linear(x, w.qdata, w.scale, w.zero_point, None,
                                                                         4, 8, w.scale_block)}
        for name, call in calls.items():
            runs = {mode: [] for mode in MODES}
            for round_ in range(args.rounds):  # the modes take turns, the first one alternating
                for mode in list(MODES)[:: 1 if round_ % 2 else -1]:
                    runs[mode].append(per_call_us(call, mode))
            med = {mode: statistics.median(v) for mode, v in runs.items()}
            rows.append({"shape": [out, k], "call": name, "runs_us": runs, "median_us": med})
            print(f"{out} x {k} {name}: no_grad {med['no_grad']:.2f} us, inference_mode {med['inference_mode']:.2f} us")
    result = {"command": f"python benchmarks/call_overhead.py --threads {args.threads} --rounds {args.rounds}",
              "kernel_backend": kernel_backend(), "threads": args.threads, "calls_per_run": CALLS, "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "call_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"A 4:8 packed weight, batch 1 (float32), {args.threads} threads, `{kernel_backend()}`; "
             f"microseconds per call, medians of {args.rounds} rounds of {CALLS} calls, the modes taking turns.", "",
             "| weight | call | `no_grad` | `inference_mode` | difference |", "|---|---|---:|---:|---:|"]
    for r in rows:
        ng, im = r["median_us"]["no_grad"], r["median_us"]["inference_mode"]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | `{r['call']}` | {ng:.2f} | {im:.2f} | {ng - im:.2f} |")
    (OUT / "call_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
