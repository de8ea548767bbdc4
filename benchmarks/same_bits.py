"""Whether two compressed model folders hold the same packed weights, tensor by tensor.

    python benchmarks/same_bits.py FOLDER_A FOLDER_B [--json OUT]

Reads every safetensors file of both folders (``save_pretrained`` or ``calibrate(Checkpoint(...))``
output, any sharding) and compares the stored tensors of each packed weight (``qdata``, ``scale``,
``zero_point``) and of everything else byte for byte. Prints one line per kind and exits 0 only if all
packed weights are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(folder: Path) -> dict[str, str]:
    """Tensor name -> sha256 of its dtype, shape and bytes, over all safetensors files of ``folder``."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                t = f.get_tensor(key).contiguous()
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                out[key] = h.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    a, b = tensors(args.a), tensors(args.b)
    packed = sorted(k for k in a if "._weight_" in k)
    other = sorted(k for k in a if "._weight_" not in k)
    result = {
        "a": str(args.a), "b": str(args.b),
        "packed_tensors": len(packed),
        "packed_identical": sum(a[k] == b.get(k) for k in packed),
        "other_tensors": len(other),
        "other_identical": sum(a[k] == b.get(k) for k in other),
        "only_in_a": sorted(set(a) - set(b)), "only_in_b": sorted(set(b) - set(a)),
    }
    result["same_packed_bits"] = result["packed_identical"] == len(packed) > 0 and not result["only_in_b"]
    print(f"packed tensors identical: {result['packed_identical']}/{len(packed)}; other tensors identical: "
          f"{result['other_identical']}/{len(other)}; only in A: {len(result['only_in_a'])}, only in B: "
          f"{len(result['only_in_b'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["same_packed_bits"] else 1


if __name__ == "__main__":
    sys.exit(main())
