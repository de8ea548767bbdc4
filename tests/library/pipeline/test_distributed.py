"""Hessians across processes: ``torchrun`` with two gloo ranks gives the packed bits of one process.

The two runs differ only in the order in which the Hessians' float64 sums of float32 batch products are
added (rank 0's batches + rank 1's, instead of batch by batch); on this data that order changes no bit
(see :class:`pbs2p.algorithms.HessianAccumulator`). Everything else (cosines, tuning steps, block errors)
is gathered and computed in the one-process order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("distributed_run.py")


def run(args: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, *args, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_ranks_give_the_bits_of_one_process(tmp_path):
    single = run([], tmp_path / "single.json")
    ranks = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path / "ranks.json")
    assert ranks.pop("ranks_agree") is True
    assert ranks == single
    assert single["checkpoint"] == single["in_memory"]  # read from disk or in memory: the same bits
