"""What PBS²P and its baselines do to a real model: perplexity, honest bits, time and memory (SmolLM2-135M, or
any model ``--model`` names).

One command compresses SmolLM2-135M with every requested method — all with the **same calibration
tokens** (``--nsamples`` segments of ``--calib-seqlen`` tokens from the calibration part of the Wikipedia
split, seed ``--seed``) and the same sequential harness (:class:`pbs2p.pipeline.SequentialRunner`) —
and measures perplexity on the **same** ``--limit`` windows of ``--seqlen`` tokens (default 2048)::

    python benchmarks/quality.py --methods main --limit 40            # the table (resumable)
    python benchmarks/quality.py --methods pbs2p-6:8,pbs2p-4:8 --zeroshot --zeroshot-limit 200
    python benchmarks/quality.py --text validation --methods pbs2p-4:8,pbs2p-4:8+true_sequential=false
    python benchmarks/quality.py --model path/to/hf_folder_or.gguf --methods main,binarize-dense --limit 10

``--text heldout`` (default) scores the held-out articles; ``--text validation`` scores windows of the
*calibration* articles that no calibration segment touches — defaults are chosen there, never on the
held-out text. Each method runs in a fresh subprocess (so its peak memory is its own) and its entry is
saved as soon as it is done: a rerun skips entries already computed unless ``--force``. Results go to
``benchmarks/results/quality/quality_<text>.{json,md,png}``.

Method names: ``fp``; ``pbs2p-N:M``: :func:`pbs2p.calibrate` with the library's defaults (every addition
beyond the paper on); ``pbs2p-N:M+paper``: the paper's method alone (binarizer, SPBO, CFS, BiLLM's block
compensation); baselines ``billm``, ``stbllm-N:M``, ``sparsegpt-N:M`` (fp16 kept weights),
``magnitude-N:M`` (data-free) and ``binarize-dense``, run plain. Modifiers, in order: ``+paper``; additions
``+act_order``, ``+refit``, ``+obs_weights`` (PBS²P only), ``+true_seq`` and ``+tune`` (also the
baselines: true-sequential stages, and scale tuning as a gain and offset of each row's kept weights per
scale block); overrides ``+key=value`` of a :class:`~pbs2p.PBS2P` field (``extras`` as ``a/b`` or
``none``) or of calibrate (``cfs=false``, ``cfs_normalize``, ``n_low``, ``n_high``, ``tune_steps``,
``tune_lr``). E.g. ``pbs2p-6:8+paper+refit``, ``stbllm-6:8+true_seq+tune``.
Groups: ``main``, ``ablations``, ``all`` and ``baselines`` (every baseline at 4:8, plus ``fp`` and
``pbs2p-4:8``). ``--model`` takes any causal LM that ``pbs2p_lab.assets.load_model`` opens (an alias, an HF
folder, a ``.gguf`` file); results of a model other than SmolLM2 go to ``runs/quality/<model>/`` unless
``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "quality"
MODEL = "smollm2"
SEQLEN = 2048  # the default perplexity window (--seqlen)
VALIDATION_RESERVE = 128  # validation windows avoid the segments of the largest calibration set (x --calib-seqlen)

ADDITIONS = ("act_order", "refit", "obs_weights", "true_seq", "tune")
MAIN = [
    "fp", "pbs2p-6:8", "pbs2p-6:8+paper", "billm", "billm+true_seq+tune",
    "stbllm-6:8", "stbllm-6:8+true_seq+tune", "pbs2p-5:8", "pbs2p-5:8+paper", "stbllm-5:8",
    "stbllm-5:8+true_seq+tune", "pbs2p-4:8", "pbs2p-4:8+paper", "stbllm-4:8", "stbllm-4:8+true_seq+tune",
    "pbs2p-2:4", "pbs2p-2:4+paper", "magnitude-4:8", "sparsegpt-4:8",
]
ABLATIONS = [f"pbs2p-6:8+paper+{a}" for a in ADDITIONS] + [  # each addition alone, column compensation included
    "pbs2p-6:8+paper+compensation=column", "pbs2p-6:8+spbo_steps=0", "pbs2p-6:8+spbo_steps=1"]
BASELINES = ["fp", "pbs2p-4:8", "billm", "stbllm-4:8", "sparsegpt-4:8", "magnitude-4:8", "binarize-dense"]
GROUPS = {"main": MAIN, "ablations": ABLATIONS, "all": MAIN + ABLATIONS, "baselines": BASELINES}
ZEROSHOT_DEFAULT = ["fp", "pbs2p-6:8", "pbs2p-4:8"]


# --------------------------------------------------------------------------------------------- data
def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def segment_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Start offsets :func:`pbs2p_lab.data.calibration.sample_segments` draws (same generator, same order)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen + 1, (nsamples,), generator=gen).tolist()


def validation_windows(n_tokens: int, limit: int, seed: int, seqlen: int = SEQLEN, calib_seqlen: int = 2048
                       ) -> list[int]:
    """Indices of aligned ``seqlen`` windows of the calibration stream untouched by any calibration segment.

    Windows avoid the segments of the largest calibration set we use (``VALIDATION_RESERVE`` segments of
    ``calib_seqlen``), so every smaller calibration set with the same seed (a prefix of the same draws) is
    excluded as well; the worker re-checks against the segments actually used.
    """
    sl = calib_seqlen
    starts = segment_starts(n_tokens, VALIDATION_RESERVE, sl, seed)
    free = [w for w in range(n_tokens // seqlen)
            if all(s + sl <= w * seqlen or s >= (w + 1) * seqlen for s in starts)]
    if len(free) < limit:
        raise ValueError(f"only {len(free)} validation windows are free of calibration segments, asked {limit}")
    return free[:limit]


# ------------------------------------------------------------------------------------------ methods
def parse_method(name: str) -> tuple[str, tuple[int, int] | None, list[str], dict[str, object]]:
    """``"pbs2p-4:8+paper+refit+cfs=false"`` -> ``("pbs2p", (4, 8), ["paper", "refit"], {"cfs": False})``."""
    head, *mods = name.split("+")
    base, _, nm = head.partition("-")
    pattern = tuple(int(x) for x in nm.split(":")) if ":" in nm else None
    if pattern is None:
        base = head
    flags = [mod for mod in mods if "=" not in mod]
    options = {key: _value(value) for key, _, value in (mod.partition("=") for mod in mods if "=" in mod)}
    unknown = [f for f in flags if f not in ("paper", *ADDITIONS)]
    if unknown:
        raise ValueError(f"unknown modifiers {unknown} in {name!r}; known: paper, {', '.join(ADDITIONS)}")
    return base, pattern, flags, options


def _value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def compress_model(name: str, model: torch.nn.Module, calib: torch.Tensor, args: argparse.Namespace) -> dict:
    """Compress ``model`` in place with method ``name``; return bits, records and per-layer errors."""
    from baseline_compressors import BitLedger, data_free, dense_compressor

    from pbs2p import ScaleTuning
    from pbs2p.pipeline.families import decoder_blocks
    from pbs2p.pipeline.sequential import SequentialRunner
    from pbs2p_lab.baselines import binarize_dense, magnitude_nm_sign, sparsegpt_nm
    from pbs2p_lab.billm import billm, stbllm

    base, nm, flags, options = parse_method(name)
    if base == "fp":
        return {"bits_per_weight": 32.0, "paper_bits": 32.0, "calibrated": False}
    if base == "pbs2p":
        return compress_pbs2p(model, calib, nm, flags, options, args)
    if set(flags) - {"true_seq", "tune"}:
        raise ValueError(f"{name}: baselines take the additions true_seq and tune only")
    ledger = BitLedger()
    if base == "magnitude":
        n, m = nm
        data_free(decoder_blocks(model), lambda W: magnitude_nm_sign(W, n, m), ledger)
        return {"bits_per_weight": ledger.bits_per_weight(), "paper_bits": ledger.paper_bits_per_weight(),
                "calibrated": False, "layers": ledger.per_layer}
    methods = {
        "billm": lambda W, H: billm(W, H, **options),
        "stbllm": lambda W, H: stbllm(W, H, *nm, **options),
        "sparsegpt": lambda W, H: sparsegpt_nm(W, H, *nm, **options),
        "binarize-dense": lambda W, H: binarize_dense(W, H, **options),
    }
    if base not in methods:
        raise ValueError(f"unknown method {name!r}")
    if base == "sparsegpt" and "tune" in flags:
        raise ValueError("sparsegpt keeps full-precision weights: there are no binarization scales to tune")
    runner = SequentialRunner(model, calib, args.batch_size)
    targets = [{n_: mod for n_, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)}
               for block in runner.blocks]
    tuning = ScaleTuning() if "tune" in flags else None
    records = runner.compress(targets, dense_compressor(methods[base], ledger, tunable=base != "sparsegpt"),
                              progress=args.progress, desc=name, true_sequential="true_seq" in flags, tuning=tuning)
    return {"bits_per_weight": ledger.bits_per_weight(), "paper_bits": ledger.paper_bits_per_weight(),
            "calibrated": True, "layers": ledger.per_layer, "errors": _errors(records),
            "harness": {"true_sequential": "true_seq" in flags, "tuning": tuning is not None},
            "block_tune": [r.tune for r in records]}


def compress_pbs2p(model: torch.nn.Module, calib: torch.Tensor, nm: tuple[int, int], flags: list[str],
                   options: dict, args: argparse.Namespace) -> dict:
    """PBS²P through the library's own :func:`pbs2p.calibrate` (CFS, packed weights)."""
    from pbs2p import calibrate

    n, m = nm
    config, options = pbs2p_options(n, m, flags, options, args.cfs_samples)
    result = calibrate(model, calib, config, batch_size=args.batch_size, progress=args.progress, **options)
    report = result.report
    return {
        "bits_per_weight": report.bits_per_weight(), "paper_bits": report.kept_fraction(), "calibrated": True,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "step"},
        "calibrate": {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in options.items()},
        "kept_fraction": report.kept_fraction(), "block_n": [b.n for b in result.blocks],
        "block_cosine": [b.cosine for b in result.blocks], "errors": _errors(result.blocks),
        "block_tune": [b.tune for b in result.blocks], "block_seconds": [round(b.seconds, 2) for b in result.blocks],
    }


def pbs2p_options(n: int, m: int, flags: list[str], options: dict, cfs_samples: int):
    """A :class:`pbs2p.PBS2P` and the keyword options of ``calibrate`` for a method name's modifiers."""
    from pbs2p import CFS, PBS2P, ScaleTuning
    from pbs2p.algorithms import EXTRAS

    paper = "paper" in flags
    extras = [e for e in EXTRAS if not paper or e in flags]
    fields = {"extras": extras} if paper else {}
    if paper:
        fields["compensation"] = "block-diag"
    options = dict(options)
    if isinstance(options.get("extras"), str):
        options["extras"] = [] if options["extras"] == "none" else options["extras"].split("/")
    fields |= {k: options.pop(k) for k in ("scale_block", "spbo_steps", "refine_rounds", "compensation", "extras")
               if k in options}
    cfs = {k: options.pop(f"cfs_{k}" if k == "normalize" else k) for k in ("n_low", "n_high", "normalize")
           if (f"cfs_{k}" if k == "normalize" else k) in options}
    tune = {k: options.pop(f"tune_{k}") for k in ("steps", "lr") if f"tune_{k}" in options}
    tuned = (not paper or "tune" in flags) and tune.get("steps", 3) > 0
    use_cfs = options.pop("cfs", True)
    calibrate_options = {
        "cfs": (CFS(samples=cfs_samples, **cfs) if m >= 8 or cfs else "auto") if use_cfs else None,
        "tuning": ScaleTuning(**tune) if tuned else None,
        "true_sequential": options.pop("true_sequential", not paper or "true_seq" in flags),
    }
    if options:
        raise ValueError(f"unknown options {sorted(options)}")
    return PBS2P(n=n, m=m, **fields), calibrate_options


def _errors(records) -> dict[str, float]:
    return {f"{r.index}.{k}": round(float(v), 5) for r in records for k, v in r.errors.items()}


def dense_weights(model: torch.nn.Module) -> int:
    """Replace packed weights by their dense dequantized values (the same numbers, plain fp32 matmuls)."""
    from pbs2p import BinarySparseTensor

    count = 0
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and isinstance(weight, BinarySparseTensor):
            mod.weight = torch.nn.Parameter(weight.dequantize(torch.float32), requires_grad=False)
            count += 1
    return count


# ------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> dict:
    """Compress with one method and measure it (runs in its own process)."""
    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.calibration import sample_segments, tokenize_text
    from pbs2p_lab.data.split import load_split
    from pbs2p_lab.eval.perplexity import perplexity

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.eval()
    split = load_split()
    cal_ids = tokenize_text(tokenizer, split.calibration_text)
    calib = sample_segments(cal_ids, args.nsamples, args.calib_seqlen, args.seed)
    load_before = os.getloadavg()
    start = time.perf_counter()
    info = compress_model(args.worker, model, calib, args)
    compress_s = time.perf_counter() - start
    load_after = os.getloadavg()
    peak_compress = peak_rss_gib()
    dense_weights(model)
    entry = {
        "method": args.worker, **info, "vocab_size": model.get_input_embeddings().weight.shape[0],
        "calibration": {"nsamples": args.nsamples, "seqlen": args.calib_seqlen, "seed": args.seed,
                        "tokens": args.nsamples * args.calib_seqlen} if info.get("calibrated") else None,
        "compress_s": compress_s, "peak_rss_gib_compress": peak_compress,
        "loadavg_before": load_before, "loadavg_after": load_after, "threads": args.threads,
    }
    if args.do_ppl:
        seqlen = args.seqlen
        if args.text == "heldout":
            ids = tokenize_text(tokenizer, split.heldout_text)
            windows = list(range(min(args.limit, ids.numel() // seqlen)))
        else:
            ids = cal_ids
            windows = validation_windows(ids.numel(), args.limit, args.seed, seqlen, args.calib_seqlen)
            starts = segment_starts(ids.numel(), args.nsamples, args.calib_seqlen, args.seed)
            for w in windows:
                if any(not (s + args.calib_seqlen <= w * seqlen or s >= (w + 1) * seqlen) for s in starts):
                    raise RuntimeError(f"validation window {w} overlaps a calibration segment")
        stream = torch.cat([ids[w * seqlen:(w + 1) * seqlen] for w in windows])
        ppl = perplexity(model, stream, seqlen, progress=args.progress)
        entry["ppl"] = ppl.ppl
        entry["ppl_detail"] = {"windows": windows, "nll_sum": ppl.nll_sum, "predicted_tokens": ppl.predicted_tokens,
                               "window_nll": [round(x, 3) for x in ppl.window_nll], "wall_s": ppl.wall_s}
    if args.do_zeroshot:
        from pbs2p_lab.eval.zeroshot import evaluate_tasks

        entry["zeroshot"] = evaluate_tasks(model, tokenizer, limit=args.zeroshot_limit)
    entry["peak_rss_gib_total"] = peak_rss_gib()
    return entry


# ------------------------------------------------------------------------------------- orchestrator
def entry_key(method: str, args: argparse.Namespace) -> str:
    """Results are keyed by method, calibration set and evaluation windows (and their length, if not 2048)."""
    seqlen = "" if args.seqlen == SEQLEN else f"seqlen{args.seqlen}|"
    return f"{method}|cal{args.nsamples}x{args.calib_seqlen}s{args.seed}|{seqlen}limit{args.limit}"


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"entries": {}}


def save_results(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def run_worker(method: str, args: argparse.Namespace, do_ppl: bool, do_zeroshot: bool) -> dict:
    if args.inline:  # this process: quick, but the peak memory is the whole run's so far
        start = time.perf_counter()
        entry = worker(argparse.Namespace(**{**vars(args), "worker": method, "do_ppl": do_ppl,
                                             "do_zeroshot": do_zeroshot}))
        return {**entry, "inline": True, "process_wall_s": time.perf_counter() - start}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "entry.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--worker-out", str(out),
               "--model", args.model,
               "--text", args.text, "--limit", str(args.limit), "--seqlen", str(args.seqlen),
               "--nsamples", str(args.nsamples),
               "--calib-seqlen", str(args.calib_seqlen), "--seed", str(args.seed), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--cfs-samples", str(args.cfs_samples),
               "--zeroshot-limit", str(args.zeroshot_limit)]
        cmd += ["--do-ppl"] if do_ppl else []
        cmd += ["--do-zeroshot"] if do_zeroshot else []
        cmd += [] if args.progress else ["--no-progress"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"worker for {method} failed with exit status {proc.returncode}")
        entry = json.loads(out.read_text())
        entry["process_wall_s"] = time.perf_counter() - start
        return entry


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        entry = worker(args)
        Path(args.worker_out).write_text(json.dumps(entry))
        return 0
    methods = expand(args.methods)
    zeroshot = expand(args.zeroshot_methods) if args.zeroshot else []
    out = args.out or (RESULTS if args.model == MODEL else Path("runs/quality") / Path(args.model).stem)
    path = out / f"quality_{args.text}.json"
    record = load_results(path)
    for method in dict.fromkeys(methods + zeroshot):
        key = entry_key(method, args)
        old = record["entries"].get(key)
        need_ppl = method in methods and (args.force or old is None or "ppl" not in old)
        need_zs = method in zeroshot and (args.force or old is None or not old.get("zeroshot"))
        if not (need_ppl or need_zs):
            print(f"[skip] {key} (computed; --force to redo)", flush=True)
            continue
        print(f"[run] {key}: ppl={need_ppl} zeroshot={need_zs}", flush=True)
        entry = run_worker(method, args, need_ppl, need_zs)
        if old and not need_ppl:  # keep the earlier perplexity, add the zero-shot scores
            entry = {**old, "zeroshot": entry["zeroshot"], "zeroshot_compress_s": entry["compress_s"]}
        entry["command"] = " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
        record["entries"][key] = entry
        record["context"] = context(args)
        save_results(path, record)
        print(f"[done] {key}: ppl={entry.get('ppl')} bits={entry['bits_per_weight']:.3f} "
              f"compress={entry['compress_s']:.0f}s peak={entry['peak_rss_gib_compress']:.2f}GiB", flush=True)
    from quality_report import write_report

    print(write_report(path))
    return 0


def expand(spec: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            out += GROUPS.get(part, [part])
    return out


def context(args: argparse.Namespace) -> dict:
    from pbs2p_lab.eval.results import package_versions

    return {
        "model": args.model, "seqlen": args.seqlen, "text": args.text,
        "text_rule": "held-out articles of pbs2p_lab.data.split" if args.text == "heldout" else
        f"aligned windows of the calibration stream untouched by the first {VALIDATION_RESERVE} "
        f"segments of {args.calib_seqlen} tokens (seed {args.seed})",
        "versions": package_versions(), "cpu_count": os.cpu_count(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL, help="model alias, HF folder or .gguf file (default smollm2)")
    p.add_argument("--out", type=Path, default=None, help=f"result folder (default {RESULTS} for smollm2, "
                                                          "runs/quality/<model> otherwise)")
    p.add_argument("--methods", default="main",
                   help="comma-separated method names or groups (main, ablations, all, baselines)")
    p.add_argument("--text", choices=("heldout", "validation"), default="heldout")
    p.add_argument("--limit", type=int, default=40, help="perplexity windows of --seqlen tokens")
    p.add_argument("--seqlen", type=int, default=SEQLEN, help=f"perplexity window length (default {SEQLEN})")
    p.add_argument("--nsamples", type=int, default=32, help="calibration segments")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration segment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: robust on a busy machine)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration segments per block forward")
    p.add_argument("--cfs-samples", type=int, default=8, help="segments for CFS's cosine similarities")
    p.add_argument("--zeroshot", action="store_true", help="also run zero-shot tasks for --zeroshot-methods")
    p.add_argument("--zeroshot-methods", default=",".join(ZEROSHOT_DEFAULT))
    p.add_argument("--zeroshot-limit", type=int, default=200)
    p.add_argument("--force", action="store_true", help="recompute entries that exist")
    p.add_argument("--inline", action="store_true",
                   help="run every method in this process, one after the other (quick on small models; the peak "
                        "memory recorded is then the whole run's)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--do-ppl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--do-zeroshot", action="store_true", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main())
