"""Calibration split over the ranks of a ``torch.distributed`` group, and what the ranks exchange.

The calibration batches (``calibration.split(batch_size)``) are dealt to the ranks in turn: batch ``b``
belongs to rank ``b % world``. Every rank runs the blocks on its own batches only; what depends on all
batches is exchanged so that every rank holds the same result as one process fed every batch:

* Hessians: each rank's float64 running sum is all-reduced (:meth:`HessianAccumulator.all_reduce`); the
  only difference from one process is the order of the float64 additions (see there);
* per-batch numbers (CFS's cosine similarities, scale tuning's block errors): each rank fills the slots of
  its batches in a zero tensor, an all-reduce sum gathers them (``x + 0`` is exact), and every rank adds
  them up in batch order, as one process does;
* the compression of a stage's linears: linear ``j`` of a stage is compressed by rank ``j % world`` and
  broadcast to the others;
* scale tuning's Adam steps: the step on batch ``b`` is computed by its rank and its loss and gradients are
  broadcast, so every rank takes the same steps in the same order as one process (this part is not
  parallel; its result is identical).

Without a group, or with a group of one rank, everything here is the identity and no collective runs.
The backend is the group's: gloo on CPUs (tensors exchanged on the CPU), NCCL on GPUs (on the compute
device); ``torchrun`` (``python -m torch.distributed.run``) starts the processes.
"""

from __future__ import annotations

import torch


class Ranks:
    """This process's share of ``n_batches`` calibration batches in ``group`` (``None``: this process alone).

    Example:
        >>> ranks = Ranks(5)
        >>> ranks.world, ranks.batches, ranks.mine(3), ranks.gather({0: 1.5, 1: 2.0})
        (1, [0, 1, 2, 3, 4], True, [1.5, 2.0])
    """

    def __init__(self, n_batches: int, group=None, device: torch.device | None = None) -> None:
        self.group = group
        self.world, self.rank = 1, 0
        if group is not None:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise ValueError("a process group was given but torch.distributed is not initialized; call "
                                 "torch.distributed.init_process_group() first (torchrun sets up the environment)")
            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
            nccl = dist.get_backend(group) == "nccl"
            self.comm_device = device if nccl and device is not None else torch.device("cpu")
        if n_batches < self.world:
            raise ValueError(f"the calibration makes {n_batches} batch(es) for {self.world} ranks: every rank needs "
                             "at least one; give more samples or a smaller batch_size")
        self.total = n_batches
        self.batches = list(range(self.rank, n_batches, self.world))

    @property
    def distributed(self) -> bool:
        """Whether other ranks take part (collectives run)."""
        return self.world > 1

    def owner(self, index: int) -> int:
        """The rank that holds batch ``index`` (or compresses the ``index``-th linear of a stage)."""
        return index % self.world

    def mine(self, index: int) -> bool:
        return self.owner(index) == self.rank

    def local(self, index: int) -> int:
        """Position of this rank's batch ``index`` among its own batches."""
        return index // self.world

    def gather(self, values: dict[int, float]) -> list[float]:
        """Every batch's value, in batch order, from each rank's ``{batch index: value}`` of its own batches."""
        if not self.distributed:
            return [values[b] for b in sorted(values)]
        import torch.distributed as dist

        slots = torch.zeros(self.total, dtype=torch.float64, device=self.comm_device)
        filled = torch.zeros(self.total, dtype=torch.int64, device=self.comm_device)
        for b, value in values.items():
            slots[b], filled[b] = value, 1
        dist.all_reduce(slots, group=self.group)
        dist.all_reduce(filled, group=self.group)
        return [float(v) for v, f in zip(slots.tolist(), filled.tolist(), strict=True) if f]

    def total_count(self, count: int) -> int:
        """The sum of an integer over the ranks."""
        if not self.distributed:
            return count
        import torch.distributed as dist

        t = torch.tensor([count], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def broadcast(self, tensors: list[torch.Tensor | None] | None, src: int, device: torch.device,
                  info: object = None) -> tuple[list[torch.Tensor | None], object]:
        """``tensors`` and the picklable ``info`` of rank ``src`` on every rank (``None`` entries stay ``None``;
        received tensors land on ``device``)."""
        if not self.distributed:
            return list(tensors), info
        import torch.distributed as dist

        header = [None]
        if self.rank == src:
            header = [(info, [None if t is None else (tuple(t.shape), t.dtype) for t in tensors])]
        dist.broadcast_object_list(header, group=self.group, group_src=src)
        info, specs = header[0]
        out = []
        for i, spec in enumerate(specs):
            if spec is None:
                out.append(None)
                continue
            shape, dtype = spec
            wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool
            if self.rank == src:
                buf = tensors[i].detach().to(self.comm_device, wire).contiguous()
            else:
                buf = torch.empty(shape, dtype=wire, device=self.comm_device)
            dist.broadcast(buf, group=self.group, group_src=src)
            out.append(tensors[i] if self.rank == src else buf.to(device, dtype))
        return out, info

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)
