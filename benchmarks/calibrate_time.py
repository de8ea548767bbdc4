"""Where the time of ``calibrate`` goes: SmolLM2-135M, the default calibration, and the seconds spent
packing, unpacking and hashing packed weights (counted and timed by wrapping those functions).

    python benchmarks/calibrate_time.py --nm 4:8 --tag after

Writes ``benchmarks/results/calibrate_time/calibrate_time_<tag>.json``. It also runs against an older
checkout of pbs2p (``PYTHONPATH=<checkout> python benchmarks/calibrate_time.py --tag before``), whose
``calibrate`` took its options from ``PBS2P``, so one machine can time both side by side.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "calibrate_time"
# (module, function) pairs that pack, unpack or hash packed weights, in both the current and the older layout
WATCHED = {
    "pack": [("pbs2p.kernels.packing", "pack")],
    "unpack": [("pbs2p.kernels.packing", "unpack"), ("pbs2p.kernels.packing", "unpack_ternary")],
    "hash": [("pbs2p.tensor.binary_sparse_tensor", "content_checksum")],
}


def watch(stats: dict[str, dict[str, float]]) -> None:
    """Wrap every watched function so that its calls and seconds (outermost calls only) are counted."""
    depth = {"n": 0}
    for kind, targets in WATCHED.items():
        stats[kind] = {"calls": 0, "seconds": 0.0}
        for module_name, name in targets:
            module = importlib.import_module(module_name)
            original = getattr(module, name)

            @functools.wraps(original)
            def wrapper(*args, _original=original, _kind=kind, **kwargs):
                outer = depth["n"] == 0
                depth["n"] += 1
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    depth["n"] -= 1
                    if outer:
                        stats[_kind]["calls"] += 1
                        stats[_kind]["seconds"] += time.perf_counter() - start

            setattr(module, name, wrapper)


def kernel_paths() -> dict[str, object]:
    """The packed linear's compute path here: the backend and, where the checkout has it, from how many rows
    float32 activations take the BLAS instead of the lookup tables (the pipeline runs 4 x 2048 rows a call)."""
    from pbs2p.kernels import ops

    blas = getattr(ops, "blas_min_batch", None)
    return {"backend": ops.kernel_backend(),
            "f32_blas_from_rows": blas(torch.float32) if blas else "never (this checkout has no float32 BLAS path)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nm", default="4:8")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", required=True, help="result file suffix, e.g. before / after")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, m = (int(v) for v in args.nm.split(":"))
    import pbs2p

    if importlib.util.find_spec("pbs2p.assets") is not None:  # a checkout from before the lab moved out
        from pbs2p.assets import load_model
        from pbs2p.data.calibration import calibration_tokens
    else:
        from pbs2p_lab.assets import load_model
        from pbs2p_lab.data.calibration import calibration_tokens

    model, tokenizer = load_model("smollm2")
    tokens = calibration_tokens(tokenizer, args.nsamples, args.seqlen, 0)
    stats: dict[str, dict[str, float]] = {}
    watch(stats)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = pbs2p.calibrate(model, tokens, pbs2p.PBS2P(n=n, m=m), progress=False)
    seconds = time.perf_counter() - start
    record = {
        "pbs2p": {"file": pbs2p.__file__, "version": pbs2p.__version__,
                  "calibrate": str(inspect.signature(pbs2p.calibrate))},
        "nm": args.nm, "calibration": f"{args.nsamples}x{args.seqlen}", "threads": args.threads,
        "kernel": kernel_paths(),
        "calibrate_s": round(seconds, 1), "linears": len(result.report.converted),
        "bits_per_weight": result.report.bits_per_weight(),
        "watched": {k: {"calls": v["calls"], "seconds": round(v["seconds"], 2)} for k, v in stats.items()},
        "loadavg_before_after": [load_before, os.getloadavg()[0]],
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "command": " ".join(["python", "benchmarks/calibrate_time.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"calibrate_time_{args.tag}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
