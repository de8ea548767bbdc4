"""Layer-level benchmark: relative output error ‖(W−Ŵ)X‖/‖WX‖ on held-out inputs, and honest bits.

Not a test (pytest does not collect it). Runs every method of ``pbs2p.algorithms`` on the same layers:

    .venv/bin/python tests/algorithms/bench_layer_errors.py --layers synthetic --out /tmp/syn.json
    .venv/bin/python tests/algorithms/bench_layer_errors.py --layers real_layers.pt --baselines

``--layers PATH.pt``: a ``torch.save``d dict ``{name: {"W": [out, in], "Hcal": [in, in], "Heval": [in, in]}}``
(Hessians ``2XXᵀ/n`` of two disjoint sets of calibration tokens; ``extract_real_hessians.py`` makes one
from SmolLM2). Layers are compressed with ``Hcal`` and scored with ``Heval``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch

from pbs2p.algorithms import compress_weight, honest_bits_per_weight
from pbs2p.algorithms.baselines import binarize_dense, sparsegpt_nm
from pbs2p.algorithms.billm import billm, stbllm
from pbs2p.algorithms.hessian import hessian_from_inputs
from pbs2p.algorithms.metrics import relative_output_error
from pbs2p.algorithms.synthetic import synthetic_layer


def synthetic_layers(count: int = 24, out: int = 256, cols: int = 576, samples: int = 2048):
    layers = []
    for seed in range(count):
        dist = "student" if seed % 2 else "gaussian"
        massive = 2 if seed % 4 == 3 else 0
        W, X = synthetic_layer(out, cols, samples=2 * samples, dist=dist, seed=seed, massive=massive)
        layers.append((f"{dist}{'-massive' if massive else ''}-{seed}", W, hessian_from_inputs(X[0::2]),
                       hessian_from_inputs(X[1::2])))
    return layers


def file_layers(path: str, keys: list[str] | None):
    data = torch.load(path)
    return [(k, d["W"].float(), d["Hcal"].float(), d["Heval"].float()) for k, d in data.items()
            if not keys or any(s in k for s in keys)]


def configs(patterns: list[tuple[int, int]], scales: list[int | None], comps: list[str], baselines: bool):
    """(label, fn(W, H) -> (W_hat, bits)) for every method × option requested."""
    cfgs = []
    for sb in scales:
        tag = "row" if sb is None else f"blk{sb}"
        for comp in comps:
            def dense(W, H, sb=sb, comp=comp):
                r = binarize_dense(W, H, scale_block=sb, compensation=comp)
                return r.W_hat, r.bits_per_weight
            cfgs.append((f"binarize-no-prune/{comp}/{tag}", dense))
            for n, m in patterns:
                for method in ("oneshot", "spbo"):
                    def pb(W, H, n=n, m=m, method=method, sb=sb, comp=comp):
                        bw = compress_weight(W, H, n=n, m=m, method=method, scale_block=sb, compensation=comp)
                        return bw.dequantize(), bw.bits_per_weight()
                    cfgs.append((f"{method}-{n}:{m}/{comp}/{tag}", pb))
    if baselines:
        cfgs.append(("billm", lambda W, H: (lambda r: (r.W_hat, r.bits_per_weight))(billm(W, H))))
        for n, m in patterns:
            cfgs.append((f"stbllm-{n}:{m}", lambda W, H, n=n, m=m: (lambda r: (r.W_hat, r.bits_per_weight))(
                stbllm(W, H, n, m))))
            cfgs.append((f"sparsegpt-{n}:{m} (fp16 kept)", lambda W, H, n=n, m=m: (
                lambda r: (r.W_hat, r.bits_per_weight))(sparsegpt_nm(W, H, n, m))))
    return cfgs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="synthetic", help="'synthetic' or a .pt file (see module docstring)")
    ap.add_argument("--keys", default="", help="comma-separated substrings selecting layers of the file")
    ap.add_argument("--patterns", default="6:8,5:8,4:8,2:4")
    ap.add_argument("--scales", default="row,128", help="'row' and/or block sizes")
    ap.add_argument("--comps", default="block,column")
    ap.add_argument("--baselines", action="store_true", help="also BiLLM, STBLLM, SparseGPT")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated substrings selecting configurations")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    patterns = [tuple(int(x) for x in p.split(":")) for p in args.patterns.split(",") if p]
    scales = [None if s == "row" else int(s) for s in args.scales.split(",") if s]
    comps = [c for c in args.comps.split(",") if c]
    keys = [k for k in args.keys.split(",") if k]
    layers = synthetic_layers() if args.layers == "synthetic" else file_layers(args.layers, keys)
    results = {}
    only = [k for k in args.only.split(",") if k]
    for label, fn in configs(patterns, scales, comps, args.baselines):
        if only and not any(k in label for k in only):
            continue
        errs, bits, t0 = {}, [], time.time()
        for name, W, Hc, He in layers:
            W_hat, b = fn(W, Hc)
            errs[name] = relative_output_error(W, W_hat, He)
            bits.append(b)
        vals = list(errs.values())
        results[label] = {"mean": statistics.fmean(vals), "median": statistics.median(vals),
                          "max": max(vals), "bits": statistics.fmean(bits), "seconds": time.time() - t0}
        if args.per_layer:
            results[label]["per_layer"] = errs
        r = results[label]
        print(f"{label:40s} mean {r['mean']:.4f}  median {r['median']:.4f}  max {r['max']:.4f}  "
              f"bits {r['bits']:.3f}  ({r['seconds']:.1f}s)", flush=True)
    print(f"honest bits at in=576, per-row fp32 scales: 4:8 {honest_bits_per_weight(4, 8, 576):.3f}, "
          f"2:4 {honest_bits_per_weight(2, 4, 576):.3f}; "
          f"per-128: 4:8 {honest_bits_per_weight(4, 8, 576, 128):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"layers": args.layers, "n_layers": len(layers), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
