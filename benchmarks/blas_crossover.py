"""Float32 packed linear: lookup tables against the expand + BLAS path, by batch, on this machine's kernel.

    python benchmarks/blas_crossover.py

Runs ``F.linear`` on a 4:8 packed weight with ``PBS2P_BLAS_MIN_BATCH`` set so that every call takes the
tables, then so that every call takes the BLAS, and dense ``F.linear`` for reference (mean ms of 5 calls
after one warm-up, 2 threads). Writes ``benchmarks/results/kernels/blas_crossover_<backend>.md``; the
default from which float32 takes the BLAS (``pbs2p.kernels.ops.blas_min_batch``) is chosen from it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402

from pbs2p import PBS2P, compress_weight  # noqa: E402
from pbs2p.kernels import ops  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]
BATCHES = [1, 8, 16, 32, 64, 512, 8192]


def mean_ms(x: torch.Tensor, w: torch.Tensor, repeats: int = 5) -> float:
    def f() -> torch.Tensor:
        return torch.nn.functional.linear(x, w)

    f()
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    torch.set_num_threads(2)
    backend = ops.kernel_backend()
    rows = ["| out x in | batch | tables ms | BLAS ms | dense F.linear ms |", "|---|---:|---:|---:|---:|"]
    for out, k in SHAPES:
        w = compress_weight(torch.randn(out, k, generator=torch.Generator().manual_seed(0)), PBS2P(n=4, m=8))
        dense = w.dequantize(torch.float32)
        for batch in BATCHES:
            if out * k * batch > 4096 * 4096 * 512:
                continue
            x = torch.randn(batch, k)
            times = []
            for env in (str(2**62), "1"):
                os.environ["PBS2P_BLAS_MIN_BATCH"] = env
                times.append(mean_ms(x, w))
            del os.environ["PBS2P_BLAS_MIN_BATCH"]
            times.append(mean_ms(x, dense))
            rows.append(f"| {out}x{k} | {batch} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} |")
            print(rows[-1], flush=True)
    text = ("# Float32 packed 4:8 linear: tables vs BLAS (`python benchmarks/blas_crossover.py`)\n\n"
            f"Backend `{backend}`, "
            f"2 threads, default BLAS from {ops.blas_min_batch(torch.float32)} rows, load average "
            f"{os.getloadavg()[0]:.2f} after. Mean ms of 5 calls.\n\n" + "\n".join(rows) + "\n")
    path = Path(__file__).resolve().parent / "results" / "kernels" / f"blas_crossover_{backend}.md"
    path.write_text(text)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
