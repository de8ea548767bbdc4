"""Calibrate a tiny LLaMA (in memory and from a checkpoint folder) alone or as one rank of ``torchrun``.

    python tests/library/pipeline/distributed_run.py OUT.json
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/library/pipeline/distributed_run.py OUT.json

Every rank checks that it holds the same packed weights; rank 0 (or the single process) writes the
digests of the in-memory result and of the folder written from the checkpoint to ``OUT.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def digest(model: torch.nn.Module) -> str:
    from helpers import packed_digest

    return packed_digest(model)[:16]


def main(out: str) -> int:
    torch.set_num_threads(1)
    from helpers import tiny_llama
    from transformers import AutoModelForCausalLM

    from pbs2p import PBS2P, Checkpoint, calibrate

    group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    rank = dist.get_rank() if group is not None else 0
    tokens = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(0)
    result = calibrate(model, tokens, PBS2P(n=4, m=8), batch_size=1, progress=False, group=group)
    found = {"in_memory": digest(model), "ns": [b.n for b in result.blocks],
             "tune": [b.tune["kept"] for b in result.blocks]}
    tmp = Path(tempfile.mkdtemp()) if rank == 0 else None
    if rank == 0:
        tiny_llama(0).save_pretrained(tmp / "src")
    if group is not None:
        shared = [tmp]
        dist.broadcast_object_list(shared)  # every rank reads the folder rank 0 has written
        tmp = shared[0]
    calibrate(Checkpoint(tmp / "src", tmp / "out"), tokens, PBS2P(n=4, m=8), batch_size=1, progress=False,
              group=group)
    if rank == 0:
        found["checkpoint"] = digest(AutoModelForCausalLM.from_pretrained(tmp / "out"))
    if group is not None:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp)
    if group is not None:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found["in_memory"])
        found["ranks_agree"] = len(set(everyone)) == 1
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
