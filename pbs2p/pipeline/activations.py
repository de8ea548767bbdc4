"""Where the calibration activations between blocks live: the compute device, host memory, or disk.

A calibration run holds a few sets of activations at a time (a block's inputs, and while its scales are
tuned its target outputs and its outputs), one tensor per batch. They stay on the compute device when
they fit (``"device"``); otherwise in host memory (``"cpu"``, each batch copied to the device when used)
or on disk (``"disk"``, accelerate's memory-mapped offload files, read back batch by batch). Moving and
storing change no value: the results are the same wherever the activations live.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

PLACEMENTS = ("device", "cpu", "disk")
#: Fraction of the free memory (device or host) that the activations may take.
BUDGET = 0.5
#: Sets of activations alive at once (inputs, tuning targets, untuned outputs, outputs).
COPIES = 4


class Activations:
    """One tensor per calibration batch, kept according to ``placement``, handed out on ``device``.

    Example:
        >>> import torch
        >>> acts = Activations(torch.device("cpu"), "disk")
        >>> acts.append(torch.arange(6.0, device="cpu").reshape(2, 3))
        >>> len(acts), acts[0].sum().item()
        (1, 15.0)
        >>> acts.release()
    """

    def __init__(self, device: torch.device, placement: str = "device", folder: OffloadFolder | None = None
                 ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"activations placement must be one of {PLACEMENTS}, got {placement!r}")
        self.device, self.placement = device, placement
        self.folder = folder if folder is not None or placement != "disk" else OffloadFolder()
        self._items: list = []

    def like(self) -> Activations:
        """An empty store with the same placement (sharing the offload folder)."""
        return Activations(self.device, self.placement, self.folder)

    def append(self, x: torch.Tensor) -> None:
        if self.placement == "device":
            self._items.append(x.to(self.device))
        elif self.placement == "cpu":
            self._items.append(x.to("cpu"))
        else:
            self._items.append(self.folder.write(x))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        return self.folder.read(item, self.device) if self.placement == "disk" else item.to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self._items)):
            yield self[index]

    def release(self) -> None:
        """Free what this store holds (its files, for ``"disk"``)."""
        if self.placement == "disk":
            for item in self._items:
                self.folder.delete(item)
        self._items = []


class OffloadFolder:
    """A temporary folder of activations offloaded with accelerate's ``offload_weight`` (numpy memmaps)."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pbs2p-activations-", dir=parent))
        self.count = 0

    def write(self, x: torch.Tensor) -> tuple[str, dict]:
        from accelerate.utils import offload_weight

        name = f"a{self.count}"
        self.count += 1
        index = offload_weight(x.detach().to("cpu").contiguous(), name, str(self.path), {})
        return name, index[name]

    def read(self, item: tuple[str, dict], device: torch.device) -> torch.Tensor:
        from accelerate.utils import load_offloaded_weight

        name, info = item
        return load_offloaded_weight(str(self.path / f"{name}.dat"), info).to(device)

    def delete(self, item: tuple[str, dict]) -> None:
        (self.path / f"{item[0]}.dat").unlink(missing_ok=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def choose_placement(batch_bytes: int, n_batches: int, device: torch.device) -> str:
    """``"device"`` if :data:`COPIES` sets of activations fit in :data:`BUDGET` of the device's free memory,
    else ``"cpu"`` (an accelerator whose activations fit in host memory), else ``"disk"``."""
    need = COPIES * batch_bytes * n_batches
    if need <= BUDGET * free_memory(device):
        return "device"
    if device.type != "cpu" and need <= BUDGET * free_memory(torch.device("cpu")):
        return "cpu"
    return "disk"


def free_memory(device: torch.device) -> float:
    """Free bytes on ``device`` (host: ``MemAvailable``); infinite where it cannot be told."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return float(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    return float("inf")
