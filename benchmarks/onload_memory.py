"""Peak memory and time of ``calibrate`` with sequential onloading against the whole model in memory.

    python benchmarks/onload_memory.py sweep --spbo-steps 0  # depth sweep: 2, 4, 8, 16 blocks of a smaller shape
    python benchmarks/onload_memory.py llama7b --blocks 4    # LLaMA-2-7B-shaped blocks from an on-disk bf16 checkpoint

Every measurement runs in a fresh subprocess (``run``) and reports that process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the seconds of each block. Checkpoints are random
LLaMA weights written as bf16 safetensors, one shard per block (``build``), in ``--workdir`` (deleted
afterwards unless ``--keep``). Two paths are measured on the same checkpoint and calibration tokens:

* ``onload``: ``calibrate(pbs2p.Checkpoint(folder, out, dtype=dtype), ...)`` — one block in memory at a
  time, the packed model written to ``out``;
* ``memory``: ``from_pretrained(folder, dtype=dtype)`` then ``calibrate(model, ...)`` — the whole model
  in memory (the path that existed before onloading).

``--dtype`` is the compute dtype of both (``sweep``: float32, the whole model in fp32 as before onloading
existed; ``llama7b``: bfloat16). The sweep measures memory against depth: ``--spbo-steps 0`` (one-shot)
makes each block cheaper to compute without changing what is held per block.

``llama7b`` also reloads the written folder with ``from_pretrained`` (in its own process) and compares its
logits with the in-memory result's, and projects the time of 32 blocks from the measured seconds per block.
Writes ``benchmarks/results/onload/{depth_sweep,llama7b_<blocks>}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "onload"
SHAPES = {  # hidden, FFN, heads, vocab
    "llama2-7b": (4096, 11008, 32, 32000),
    "small": (1024, 2816, 16, 32000),
}


# ------------------------------------------------------------------------------------ the checkpoint
def build(folder: Path, shape: str, blocks: int, seed: int = 0) -> Path:
    """A random LLaMA checkpoint of ``blocks`` blocks of ``shape`` as bf16 safetensors, one shard per block."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, ffn, heads, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    shards = blocks + 1
    weight_map, total = {}, 0
    for i in range(shards):
        if i < blocks:
            p = f"model.layers.{i}."
            tensors = {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"{p}self_attn.{name}.weight"] = rand(hidden, hidden, scale=hidden**-0.5)
            tensors[p + "mlp.gate_proj.weight"] = rand(ffn, hidden, scale=hidden**-0.5)
            tensors[p + "mlp.up_proj.weight"] = rand(ffn, hidden, scale=hidden**-0.5)
            tensors[p + "mlp.down_proj.weight"] = rand(hidden, ffn, scale=ffn**-0.5)
        else:
            tensors = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0),
                       "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       "lm_head.weight": rand(vocab, hidden, scale=hidden**-0.5)}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def calibration(vocab: int, samples: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------ one measurement
def measure(args: argparse.Namespace) -> dict:
    """Runs in its own process: calibrate one way, report peak RSS and times (and logits, if asked)."""
    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoModelForCausalLM

    import pbs2p

    vocab = AutoConfig.from_pretrained(args.checkpoint).vocab_size
    tokens = calibration(vocab, args.samples, args.seqlen)
    dtype = getattr(torch, args.dtype)
    config = pbs2p.PBS2P(n=4, m=8, spbo_steps=args.spbo_steps)
    start = time.perf_counter()
    record: dict = {"path": args.path}
    if args.path == "onload":
        result = pbs2p.calibrate(pbs2p.Checkpoint(args.checkpoint, args.out, dtype=dtype), tokens, config,
                                 progress=False)
    elif args.path == "memory":
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        record["load_s"] = time.perf_counter() - start
        result = pbs2p.calibrate(model, tokens, config, progress=False)
    else:  # "reload": the written folder, for its logits only
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
        result = None
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["wall_s"] = time.perf_counter() - start
    if result is not None:
        record["calibrate_s"] = result.seconds
        record["block_s"] = [round(b.seconds, 2) for b in result.blocks]
        record["block_n"] = [b.n for b in result.blocks]
        record["bits_per_weight"] = result.report.bits_per_weight()
        record["converted"] = len(result.report.converted)
    if args.logits:
        with torch.no_grad():
            logits = model(calibration(vocab, 1, 64)).logits
        torch.save(logits, args.logits)
    return record


def run(checkpoint: Path, path: str, args: argparse.Namespace, out: Path | None = None,
        logits: Path | None = None) -> dict:
    """:func:`measure` in a fresh subprocess."""
    cmd = [sys.executable, __file__, "run", "--checkpoint", str(checkpoint), "--path", path,
           "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--threads", str(args.threads),
           "--dtype", args.dtype]
    cmd += ["--spbo-steps", str(args.spbo_steps)] if args.spbo_steps is not None else []
    cmd += ["--out", str(out)] if out else []
    cmd += ["--logits", str(logits)] if logits else []
    before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["loadavg_before_after"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(record), flush=True)
    return record


def header(args: argparse.Namespace) -> dict:
    from pbs2p_lab.eval.results import package_versions

    return {"command": "python benchmarks/onload_memory.py " + " ".join(sys.argv[1:]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads, "cpu_count": os.cpu_count(),
            "calibration": f"{args.samples}x{args.seqlen} random token ids", "compute_dtype": args.dtype,
            "config": f"PBS2P(n=4, m=8, spbo_steps={args.spbo_steps}), calibrate defaults (CFS, 3 tuning passes)",
            "versions": package_versions()}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


# ------------------------------------------------------------------------------------ commands
def sweep(args: argparse.Namespace) -> int:
    rows = []
    for blocks in args.depths:
        folder = build(args.workdir / f"small-{blocks}", "small", blocks)
        row = {"blocks": blocks}
        for path in ("onload", "memory"):
            out = args.workdir / f"out-{blocks}" if path == "onload" else None
            row[path] = run(folder, path, args, out)
            shutil.rmtree(out, ignore_errors=True) if out else None
        rows.append(row)
        if not args.keep:
            shutil.rmtree(folder)
    hidden, ffn, heads, _ = SHAPES["small"]
    record = {**header(args), "shape": {"hidden": hidden, "ffn": ffn, "heads": heads}, "rows": rows}
    peaks = [r["onload"]["peak_rss_bytes"] for r in rows]
    record["onload_peak_spread"] = (max(peaks) - min(peaks)) / min(peaks)
    lines = [f"# Peak RSS of calibrate against depth (hidden {hidden}, FFN {ffn}, bf16 checkpoint computed in "
             f"{args.dtype}, {args.samples}x{args.seqlen} calibration, {record['config']}, {args.threads} threads)",
             "",
             "| blocks | onload peak RSS (GiB) | in-memory peak RSS (GiB) | onload s/block | in-memory s/block |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, m = r["onload"], r["memory"]
        lines.append(f"| {r['blocks']} | {gib(o['peak_rss_bytes'])} | {gib(m['peak_rss_bytes'])} | "
                     f"{sum(o['block_s']) / len(o['block_s']):.1f} | {sum(m['block_s']) / len(m['block_s']):.1f} |")
    lines += ["", f"Onload peak RSS spread over depths: {100 * record['onload_peak_spread']:.1f} % "
                  "((max - min) / min)."]
    write(record, lines, "depth_sweep")
    return 0


def llama7b(args: argparse.Namespace) -> int:
    folder = build(args.workdir / f"llama2-7b-{args.blocks}", "llama2-7b", args.blocks)
    out = args.workdir / "compressed"
    onload = run(folder, "onload", args, out)
    reloaded = run(out, "reload", args, logits=args.workdir / "reloaded.pt")
    memory = run(folder, "memory", args, logits=args.workdir / "memory.pt") if not args.no_memory else None
    record = {**header(args), "blocks": args.blocks, "shape": dict(zip(("hidden", "ffn", "heads", "vocab"),
                                                                         SHAPES["llama2-7b"], strict=True)),
              "onload": onload, "reload": reloaded, "memory": memory}
    per_block = sum(onload["block_s"]) / len(onload["block_s"])
    record["seconds_per_block"] = per_block
    record["projected_32_blocks_s"] = 32 * per_block
    record["output_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    if memory is not None:
        a = torch.load(args.workdir / "reloaded.pt")
        b = torch.load(args.workdir / "memory.pt")
        record["logits_equal"] = bool(torch.equal(a, b))
        record["logits_max_abs_diff"] = float((a.float() - b.float()).abs().max())
    lines = [f"# LLaMA-2-7B-shaped blocks from an on-disk bf16 checkpoint ({args.blocks} blocks computed in "
             f"{args.dtype}, {args.samples}x{args.seqlen} calibration, {record['config']}, {args.threads} threads)",
             "",
             f"- onload peak RSS: {gib(onload['peak_rss_bytes'])} GiB; seconds per block: "
             f"{', '.join(f'{s:.0f}' for s in onload['block_s'])} (mean {per_block:.0f} s)",
             f"- projected time of 32 blocks: {32 * per_block / 3600:.2f} h (32 x mean seconds per block; "
             "the CFS pass over the blocks and the copy of embeddings/LM head add to it)",
             f"- written folder: {record['output_bytes'] / 2**30:.2f} GiB"]
    if memory is not None:
        lines += [f"- in-memory path on the same checkpoint: peak RSS {gib(memory['peak_rss_bytes'])} GiB",
                  f"- reloaded folder's logits equal the in-memory result's: {record['logits_equal']} "
                  f"(max abs diff {record['logits_max_abs_diff']})"]
    write(record, lines, f"llama7b_{args.blocks}")
    if not args.keep:
        shutil.rmtree(args.workdir / f"llama2-7b-{args.blocks}")
        shutil.rmtree(out)
    return 0


def write(record: dict, lines: list[str], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("sweep", "llama7b", "run"):
        p = sub.add_parser(name)
        p.add_argument("--samples", type=int, default=4)
        p.add_argument("--seqlen", type=int, default=256)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--dtype", default="bfloat16" if name == "llama7b" else "float32",
                       choices=("float32", "bfloat16"), help="compute dtype of both paths")
        p.add_argument("--spbo-steps", type=int, default=None, help="PBS2P.spbo_steps (default: the method's)")
        if name != "run":
            p.add_argument("--workdir", type=Path, default=None, help="where checkpoints are built (default: tmp)")
            p.add_argument("--keep", action="store_true", help="keep the built checkpoints")
    sub.choices["sweep"].add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    sub.choices["llama7b"].add_argument("--blocks", type=int, default=4)
    sub.choices["llama7b"].add_argument("--no-memory", action="store_true", help="skip the in-memory comparison")
    p = sub.choices["run"]
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--path", choices=("onload", "memory", "reload"), required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--logits", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        print(json.dumps(measure(args)))
        return 0
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pbs2p-onload-"))
    return sweep(args) if args.command == "sweep" else llama7b(args)


if __name__ == "__main__":
    sys.exit(main())
