"""How many calibration segments CFS needs: block cosines and per-block N from 1, 2, 4 and 8 segments.

CFS (coarse) gives each decoder block its N from the cosine similarity of the block's input and output
hidden states (:meth:`pbs2p.pipeline.SequentialRunner.block_cosines`). Measuring them costs a forward of
the uncompressed model per segment (about 16 s per 2048-token segment for SmolLM2 on one busy core), so
the number of segments matters for the 10-minute budget. This script measures the cosines of each of the
first 8 calibration segments separately (one pass) and prints, for every N target, the allocation from the
first 1, 2, 4 and 8 segments and how many blocks differ from the 8-segment allocation::

    python benchmarks/cfs_samples.py        # writes benchmarks/results/quality/cfs_samples.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "quality" / "cfs_samples.json"


def main() -> int:
    from pbs2p.algorithms import allocate_n
    from pbs2p.pipeline import SequentialRunner
    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.calibration import calibration_tokens

    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    calib = calibration_tokens(tok, 8, 2048, 0)
    start = time.perf_counter()
    runner = SequentialRunner(model, calib, batch_size=1)
    per_sample = []  # [sample][block]
    for s in range(calib.shape[0]):
        x = [runner.hidden[s]]
        row = []
        with torch.no_grad():
            for i in range(len(runner.blocks)):
                y = _run(runner, i, x, s)
                row.append(float(torch.nn.functional.cosine_similarity(x[0], y[0], dim=-1).mean()))
                x = y
        per_sample.append(row)
    seconds = time.perf_counter() - start
    sizes = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in runner.blocks]
    result = {"seconds_for_8_segments": seconds, "loadavg": os.getloadavg(), "cosines_per_segment": per_sample,
              "allocations": {}}
    for n, m in ((6, 8), (5, 8), (4, 8), (2, 4)):
        allocs = {}
        for k in (1, 2, 4, 8):
            cos = [sum(row[i] for row in per_sample[:k]) / k for i in range(len(sizes))]
            allocs[k] = allocate_n(cos, n, m, max(1, n - 1), min(m - 1, n + 1), sizes)
        diff = {k: sum(a != b for a, b in zip(allocs[k], allocs[8], strict=True)) for k in allocs}
        result["allocations"][f"{n}:{m}"] = {"per_segments": allocs, "blocks_differing_from_8": diff}
        print(f"{n}:{m} blocks differing from the 8-segment allocation: {diff}")
        for k, a in allocs.items():
            print(f"  {k} segment(s): {a}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{seconds:.0f} s for 8 segments (load {os.getloadavg()[0]:.1f}); written {OUT}")
    return 0


def _run(runner, i: int, x: list[torch.Tensor], sample: int) -> list[torch.Tensor]:
    call = runner.calls[i][sample]
    out = runner.blocks[i](x[0], *call.args, **call.kwargs)
    return [out[0] if isinstance(out, tuple) else out]


if __name__ == "__main__":
    sys.exit(main())
