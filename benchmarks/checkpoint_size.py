"""Bytes on disk of a compressed SmolLM2 checkpoint, decoder linears against their fp32 size.

    python benchmarks/checkpoint_size.py [--nm 4:8]

Converts SmolLM2-135M's decoder linears with the data-free ``quantize_`` (the packed format, and so its
size, does not depend on which weights are kept), saves the model with ``save_pretrained`` (packed
safetensors), and sums, from the saved file, the bytes of every stored tensor of each decoder linear's
weight (packed signs + kept-set indices, α, μ). Compared with the same weights at fp32 (4 bytes each).
It then reloads the folder with ``from_pretrained`` and checks the packed bytes come back identical.
Writes ``benchmarks/results/checkpoint/checkpoint_size_<N>of<M>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import pbs2p  # noqa: E402
from pbs2p_lab.assets import load_model  # noqa: E402
from pbs2p_lab.eval.results import package_versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint"


def linear_bytes_on_disk(path: Path) -> dict[str, int]:
    """Stored bytes per decoder-linear weight (``model.layers.<i>.<...>.weight``), from a safetensors file."""
    sizes: dict[str, int] = defaultdict(int)
    with safe_open(path, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
            if ".layers." in key and "._weight_" in key:
                sizes[key.split("._weight_")[0] + ".weight"] += f.get_tensor(key).nbytes
    return dict(sizes)


def packed_weights(model: torch.nn.Module) -> dict[str, pbs2p.BinarySparseTensor]:
    """The packed weights of ``model``, by parameter name."""
    return {name: p for name, p in model.named_parameters() if isinstance(p, pbs2p.BinarySparseTensor)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nm", default="4:8")
    args = parser.parse_args(argv)
    n, m = (int(x) for x in args.nm.split(":"))

    model, _ = load_model("smollm2")
    report = pbs2p.quantize_(model, pbs2p.PBS2P(n=n, m=m))
    weights = packed_weights(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(Path(tmp).glob("*.safetensors"))
        if len(files) != 1:
            raise RuntimeError(f"expected one safetensors file, found {[f.name for f in files]}")
        on_disk = linear_bytes_on_disk(files[0])
        file_bytes = files[0].stat().st_size
        reloaded = AutoModelForCausalLM.from_pretrained(tmp)
        back = packed_weights(reloaded)
    missing = sorted(set(weights) - set(on_disk))
    if missing:
        raise RuntimeError(f"no stored tensors found for {missing[:3]} ...")
    identical = set(back) == set(weights) and all(
        torch.equal(back[k].qdata, w.qdata) and torch.equal(back[k].scale, w.scale)
        and torch.equal(back[k].zero_point, w.zero_point) for k, w in weights.items())
    numel = sum(w.numel() for w in weights.values())
    stored = sum(on_disk[k] for k in weights)
    fp32 = 4 * numel
    result = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/checkpoint_size.py --nm " + args.nm,
        "nm": args.nm, "linears": len(weights), "skipped": len(report.skipped), "weights": numel,
        "stored_bytes": stored, "fp32_bytes": fp32, "ratio_to_fp32": stored / fp32,
        "bits_per_weight_on_disk": 8 * stored / numel,
        "bits_per_weight_reported": sum(w.bits_per_weight() * w.numel() for w in weights.values()) / numel,
        "file_bytes": file_bytes, "reload_identical": identical, "versions": package_versions(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"checkpoint_size_{n}of{m}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = (
        f"SmolLM2-135M, PBS²P {args.nm}, `save_pretrained` safetensors (`{result['command']}`).\n\n"
        "| decoder linears | weights | stored bytes | fp32 bytes | stored / fp32 | bits/weight on disk "
        "| whole file | reload bit-identical |\n|---:|---:|---:|---:|---:|---:|---:|---|\n"
        f"| {len(weights)} | {numel:,} | {stored:,} | {fp32:,} | 1/{fp32 / stored:.1f} "
        f"| {result['bits_per_weight_on_disk']:.3f} | {file_bytes / 2**20:.1f} MiB | {identical} |\n"
    )
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
