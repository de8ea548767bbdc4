"""Command line: ``pbs2p {fetch,compress,eval,run,generate,report}`` (also ``python -m pbs2p``).

``pbs2p run`` is the main job: load SmolLM2, measure FP perplexity on held-out Wikipedia text, compress
the decoder blocks' linears with PBS²P, measure again, print FP vs compressed and write a result JSON.
Embeddings and the LM head always stay in full precision.

Examples::

    pbs2p fetch                                    # download + verify every packaged asset once
    pbs2p run --nm 4:8 --nsamples 8 --ppl-limit 40 --out runs/smollm2_4of8.json
    pbs2p eval --model smollm2 --tasks default --limit 200 --out benchmarks/results/fp/smollm2.json
    pbs2p compress --model smollm2 --nm 6:8 --out runs/smollm2_6of8 && pbs2p eval --model runs/smollm2_6of8
    pbs2p compress --model path/to/hf_folder --calib-text my_domain.txt --out runs/mine_4of8
    pbs2p compress --model path/to/hf_folder --calib-dataset my_corpus.jsonl --calib-rows 500 --out runs/c_4of8
    pbs2p eval --model runs/mine_4of8 --tasks piqa,path/to/my_task.yaml --limit 100
    pbs2p generate --model runs/smollm2_6of8 --prompt "The history of" --max-new-tokens 64 --embeddings int8
    pbs2p report benchmarks/results/*/*.json --out benchmarks/report

``compress`` and ``eval`` need ``--model``; ``run`` defaults to SmolLM2. ``--tasks`` takes the bundled offline
tasks, any lm-eval task name whose data is available offline, and paths of lm-eval task YAMLs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pbs2p_lab.data.calibration import DEFAULT_NSAMPLES

__all__ = ["build_parser", "main"]


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N:M such as 4:8, got {text!r}") from exc
    return n, m


def _count(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "positive integer" if low == 1 else "non-negative integer"
    return parse


_positive, _non_negative = _count(1), _count(0)


def _limit(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a limit is a positive number or 'all', got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is a positive number or 'all'")
    return value


def _tasks(text: str) -> tuple[str, ...]:
    """Bundled task names, lm-eval task names or paths of lm-eval task YAMLs (checked by
    :func:`_check_tasks`, before the model loads)."""
    from pbs2p_lab.eval.task_configs import DEFAULT_TASKS

    if text == "none":
        return ()
    names = DEFAULT_TASKS if text == "default" else tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("no task names; give tasks, 'default' or 'none'")
    return names


def _check_tasks(tasks: Sequence[str]) -> None:
    """Refuse, before the model loads, tasks that lm-eval cannot load here (unknown, or data not available
    offline), with the task and the cause."""
    from pbs2p_lab.eval.task_configs import AVAILABLE_TASKS
    from pbs2p_lab.eval.zeroshot import load_tasks

    if all(t in AVAILABLE_TASKS for t in tasks):
        return  # bundled: checked by their sha256 when prepared
    try:
        load_tasks(tasks)
    except Exception as exc:  # noqa: BLE001  (lm-eval and datasets raise many kinds; one line names the cause)
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"--tasks {','.join(tasks)}: lm-eval cannot load them here ({type(exc).__name__}: "
                           f"{reason}); bundled offline tasks: {', '.join(AVAILABLE_TASKS)}, or give lm-eval task "
                           "names whose data is cached, or paths of task YAMLs") from exc


def _add_model(p: argparse.ArgumentParser, default: str | None = None) -> None:
    what = "built-in alias (smollm2, tiny), a `pbs2p compress` folder, an HF folder, a .gguf file or a hub id"
    if default is None:
        p.add_argument("--model", required=True, help=what)
    else:
        p.add_argument("--model", default=default, help=f"{what} (default {default})")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(text: str) -> str:
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; known: float32, bfloat16, float16 "
                                         "(or fp32, bf16, fp16)")
    return DTYPES[text.lower()]


def _add_placement(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs")
    g.add_argument("--device", default="cpu",
                   help="compute device: cpu, cuda, cuda:1, mps, ... (default cpu); `compress` keeps the model "
                        "on the CPU and moves one block at a time there, `run` and `eval` move the model")
    g.add_argument("--dtype", type=_dtype, default="float32",
                   help="dtype of the model and its compute: float32, bfloat16, float16 (fp16 needs an "
                        "accelerator; default float32)")


def _placement(args: argparse.Namespace):
    """``(torch.device, torch.dtype)`` of ``--device``/``--dtype``, refused here if this machine lacks them."""
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise CommandError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from exc
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise CommandError(f"--device {args.device}: this torch sees no {device.type} device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise CommandError("--dtype float16 needs an accelerator (--device cuda or mps); on the CPU use bfloat16")
    return device, dtype


def _add_embeddings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", choices=("model", "int8"), default="model",
                   help="int8: store the input embedding and LM head as int8 rows with a scale per row (tied stay "
                        "tied; pbs2p.int8_embeddings_(), beyond the paper; changes the outputs); default model: as "
                        "the model holds them")


def _apply_embeddings(model, args: argparse.Namespace) -> dict | None:
    """Apply ``--embeddings``; what was done, for the result record (``None`` when nothing was asked)."""
    if args.embeddings == "model":
        return None
    from pbs2p import int8_embeddings_

    try:
        report = int8_embeddings_(model)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"--embeddings int8: {exc}") from exc
    return {"format": "int8 rows, float32 scale per row", "tied": report.tied,
            "bytes_before": report.bytes_before, "bytes_after": report.bytes_after}


def _fp_label(args: argparse.Namespace) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]


def _extras(text: str) -> tuple[str, ...]:
    from pbs2p.algorithms import EXTRAS

    names = () if text == "none" else tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in EXTRAS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown extra(s) {unknown}; known: {', '.join(EXTRAS)} (or 'none')")
    return names


def _add_compression(p: argparse.ArgumentParser) -> None:
    from pbs2p.algorithms import EXTRAS
    from pbs2p.algorithms.method import COMPENSATIONS

    g = p.add_argument_group("compression (PBS2P; options left unset keep the defaults)")
    g.add_argument("--nm", type=_nm, default=(4, 8), help="N:M sparsity, e.g. 4:8, 6:8, 2:4 (default 4:8)")
    g.add_argument("--scale-block", type=_positive, help="columns per (alpha, mu) pair (default: one pair per row)")
    g.add_argument("--spbo-steps", type=_non_negative, help="SPBO steps tau (default m - n; 0 = one-shot)")
    g.add_argument("--refine-rounds", type=_non_negative, help="binarizer refinement rounds (default 3)")
    g.add_argument("--compensation", choices=COMPENSATIONS, help="error compensation (default column)")
    g.add_argument("--extras", type=_extras, help=f"additions beyond the paper, comma-separated or 'none' "
                                                  f"(default {','.join(EXTRAS)})")
    g = p.add_argument_group("calibration (pbs2p.calibrate; --nsamples 0 = data-free quantize_)")
    g.add_argument("--nsamples", type=_non_negative, default=DEFAULT_NSAMPLES,
                   help=f"calibration segments of the calibration text (default {DEFAULT_NSAMPLES})")
    g.add_argument("--calib-seqlen", type=_positive, default=2048, help="tokens per calibration segment")
    g.add_argument("--calib-text", type=Path, metavar="FILE",
                   help="UTF-8 text file to calibrate on (pbs2p.calibration_tokens; it must hold at least "
                        "nsamples x calib-seqlen tokens; default: the calibration part of the packaged Wikipedia "
                        "split)")
    g.add_argument("--calib-dataset", metavar="SOURCE",
                   help="calibrate on a datasets dataset instead: a save_to_disk folder, a .json/.jsonl/.csv/.parquet/"
                        ".txt file, or a dataset name in the local datasets cache (its --calib-column rows joined)")
    g.add_argument("--calib-split", help="split of --calib-dataset (default train)")
    g.add_argument("--calib-column", help="text column of --calib-dataset (default text)")
    g.add_argument("--calib-rows", type=_positive, help="rows of --calib-dataset read, from the first (default 2000)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")
    g.add_argument("--cfs", action=argparse.BooleanOptionalAction, default=True, help="CFS per-block N (default on)")
    g.add_argument("--cfs-normalize", choices=("mean", "median"), help="CFS importance normalisation")
    g.add_argument("--n-low", type=_positive, help="CFS lower bound of a block's N (default n - 1)")
    g.add_argument("--n-high", type=_positive, help="CFS upper bound of a block's N (default n + 1)")
    g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="compress a block's linears in stages (default on)")
    g.add_argument("--tune-steps", type=_non_negative, default=3,
                   help="scale-tuning passes per block (0 = off; default 3)")
    g.add_argument("--tune-lr", type=float, help="scale-tuning learning rate (default 0.01)")


def _add_measure(p: argparse.ArgumentParser, tasks_default: str) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--seqlen", type=_positive, default=2048, help="perplexity window (default 2048)")
    g.add_argument("--ppl-limit", type=_limit, default=None, help="max perplexity windows, or 'all'")
    g.add_argument("--tasks", type=_tasks, default=_tasks(tasks_default),
                   help=f"comma-separated zero-shot tasks, 'default' or 'none' (default {tasks_default})")
    g.add_argument("--limit", type=_limit, default=None, help="zero-shot examples per task, or 'all'")
    g.add_argument("--batch-size", type=_positive, default=8, help="zero-shot batch size")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``pbs2p`` command."""
    from pbs2p import __version__

    parser = argparse.ArgumentParser(prog="pbs2p", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pbs2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download, verify and cache the packaged model/text/task assets")
    p.add_argument("what", nargs="*", default=["smollm2", "tiny", "text", "tasks"],
                   help="any of smollm2, tiny, text, tasks (default: all)")

    p = sub.add_parser("compress", help="compress a model's decoder linears and save it")
    _add_model(p)
    _add_placement(p)
    _add_compression(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (reload it with --model OUT)")

    p = sub.add_parser("eval", help="held-out perplexity and/or zero-shot tasks of a model")
    _add_model(p)
    _add_placement(p)
    _add_measure(p, tasks_default="none")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    _add_embeddings(p)
    p.add_argument("--out", type=Path, help="result JSON to write")

    p = sub.add_parser("run", help="FP vs PBS2P on SmolLM2: perplexity, bits/weight, size, time")
    _add_model(p, default="smollm2")
    _add_placement(p)
    _add_compression(p)
    _add_measure(p, tasks_default="none")
    p.set_defaults(ppl_limit=40)
    p.add_argument("--out", type=Path, help="result JSON (default runs/run_<model>_<N>of<M>.json)")

    p = sub.add_parser("generate", help="greedy generation (static cache, compiled step): streams text, prints "
                                        "tokens/s")
    _add_model(p)
    _add_placement(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_positive, default=128, help="tokens to generate (default 128)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    p.add_argument("--cpp-wrapper", action="store_true", help="compile the decode step's host code to C++ too "
                   "(Inductor's cpp_wrapper: no Python between operators; a longer first compilation)")
    _add_embeddings(p)

    p = sub.add_parser("report", help="markdown table + plots from result JSONs")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/report"), help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pbs2p`` and ``python -m pbs2p``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from pbs2p_lab.assets import AssetError, OutputFolderError

    commands = {"fetch": _cmd_fetch, "compress": _cmd_compress, "eval": _cmd_eval, "run": _cmd_run,
                "generate": _cmd_generate, "report": _cmd_report}
    try:
        return commands[args.command](args)
    except (AssetError, CommandError, OutputFolderError) as exc:
        print(f"pbs2p: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------- commands
class CommandError(RuntimeError):
    """A problem with what the user asked for, reported as one line (exit status 2)."""


def _check_output_file(path: Path) -> Path:
    """Refuse, before any work, a result file that could not be written at the end."""
    import os

    if path.is_dir():
        raise CommandError(f"--out {path} is a folder; give a file name, e.g. {path / 'result.json'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"cannot create {path}: {parent} is a file, not a folder")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise CommandError(f"cannot write {path}: no write permission in {parent}")
    return path


def _read_json(path: Path, what: str, records: bool = False) -> dict | list:
    """A JSON file the command needs (an object; with ``records`` also a list of objects), or a one-line
    error that says which and why."""
    import json

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CommandError(f"{what} {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise CommandError(f"{what} {path} is a folder, not a JSON file") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"{what} {path} is not valid JSON (truncated or damaged?): {exc}") from exc
    except OSError as exc:
        raise CommandError(f"cannot read {what} {path}: {exc}") from exc
    if records and isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return data
    if not isinstance(data, dict):
        raise CommandError(f"{what} {path} holds a JSON {type(data).__name__}, not an object")
    return data


def _cmd_fetch(args: argparse.Namespace) -> int:
    from pbs2p_lab.assets import model_dir

    for what in args.what:
        if what in ("smollm2", "tiny"):
            print(f"{what}: {model_dir(what)}")
        elif what == "text":
            from pbs2p_lab.data.split import load_split

            split = load_split()
            print(f"text: {len(split.calibration)} calibration + {len(split.heldout)} held-out articles")
        elif what == "tasks":
            from pbs2p_lab.eval.task_configs import AVAILABLE_TASKS, prepare_tasks

            print(f"tasks: {', '.join(AVAILABLE_TASKS)} in {prepare_tasks(AVAILABLE_TASKS)}")
        else:
            print(f"pbs2p fetch: unknown asset {what!r} (smollm2, tiny, text, tasks)", file=sys.stderr)
            return 2
    return 0


def _decoder_linear_filter(model):
    """(blocks prefix, ``filter_fn``) selecting the nn.Linear modules inside the decoder blocks
    (so never the embeddings or the LM head)."""
    import torch

    from pbs2p.pipeline import decoder_blocks

    try:
        blocks = decoder_blocks(model)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    prefix = next(name for name, mod in model.named_modules() if mod is blocks) + "."
    return prefix, lambda module, name: isinstance(module, torch.nn.Linear) and name.startswith(prefix)


def _pbs2p_config(args: argparse.Namespace):
    """The PBS2P config and the calibrate options the arguments ask for (refusing unused options)."""
    from pbs2p import CFS, PBS2P, ScaleTuning

    n, m = args.nm
    names = ("scale_block", "spbo_steps", "refine_rounds", "compensation", "extras")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    calibration_only = {"--cfs-normalize": args.cfs_normalize, "--n-low": args.n_low, "--n-high": args.n_high,
                        "--tune-lr": args.tune_lr, "--compensation": args.compensation, "--extras": args.extras,
                        "--calib-text": args.calib_text, "--calib-dataset": args.calib_dataset}
    if args.nsamples == 0:
        given = [flag for flag, value in calibration_only.items() if value is not None]
        given += ["--no-cfs"] * (not args.cfs) + ["--no-true-sequential"] * (not args.true_sequential)
        if given or args.tune_steps != 3:
            raise CommandError(f"{given or ['--tune-steps']} act only with calibration data; "
                               "--nsamples 0 compresses data-free")
    try:
        config = PBS2P(n=n, m=m, **options)
        cfs = None
        if args.cfs:
            cfs_options = {"n_low": args.n_low, "n_high": args.n_high, "normalize": args.cfs_normalize}
            cfs = CFS(**{k: v for k, v in cfs_options.items() if v is not None})
        elif args.cfs_normalize or args.n_low or args.n_high:
            raise CommandError("--cfs-normalize, --n-low and --n-high need --cfs")
        tuning = None
        if args.tune_steps > 0:
            tuning = ScaleTuning(steps=args.tune_steps, **({"lr": args.tune_lr} if args.tune_lr else {}))
        elif args.tune_lr is not None:
            raise CommandError("--tune-lr needs --tune-steps > 0")
        if cfs is not None:
            cfs.bounds(n, m)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"invalid compression options: {exc}") from exc
    if args.calib_text is not None:
        _check_text_file(args.calib_text)
    _open_dataset(args)
    return config, {"cfs": cfs, "true_sequential": args.true_sequential, "tuning": tuning}


def _check_text_file(path: Path) -> None:
    """Refuse, before the model loads, a calibration text file that cannot be read or holds no text."""
    from pbs2p.pipeline.text import read_text_file

    try:
        text = read_text_file(path)
    except (OSError, ValueError) as exc:
        raise CommandError(f"--calib-text: {exc}") from exc
    if not text.strip():
        raise CommandError(f"--calib-text {path} is empty")


def _open_dataset(args: argparse.Namespace) -> None:
    """Open ``--calib-dataset`` before the model loads, refusing what cannot be used: sets ``args.dataset`` to
    ``(rows, description)``, or ``None``."""
    args.dataset = None
    dataset_options = {"--calib-split": args.calib_split, "--calib-column": args.calib_column,
                       "--calib-rows": args.calib_rows}
    if args.calib_dataset is None:
        given = [flag for flag, value in dataset_options.items() if value is not None]
        if given:
            raise CommandError(f"{given} act only with --calib-dataset")
        return
    if args.calib_text is not None:
        raise CommandError("--calib-text and --calib-dataset are two calibration sources: give one")
    from pbs2p_lab.data.text_dataset import describe_text_dataset, load_text_dataset

    split, column = args.calib_split or "train", args.calib_column or "text"
    try:
        rows = load_text_dataset(args.calib_dataset, split=split, column=column, rows=args.calib_rows or 2000)
    except ValueError as exc:
        raise CommandError(f"--calib-dataset: {exc}") from exc
    args.dataset = rows, describe_text_dataset(args.calib_dataset, rows, split=split, column=column)


def _calibration_set(tokenizer, args: argparse.Namespace, split):
    """``(tokens, description)`` of the calibration set (``(None, None)`` data-free), drawn right after the
    model loads, so that too little ``--calib-text`` is refused before any measurement or compression."""
    from pbs2p_lab.data.calibration import calibration_tokens, describe_calibration

    if args.nsamples == 0:
        return None, None
    sampling = args.nsamples, args.calib_seqlen, args.seed
    if args.calib_text is None and args.dataset is None:
        return calibration_tokens(tokenizer, *sampling, split), describe_calibration(*sampling, split)
    from pbs2p import calibration_tokens as text_tokens

    if args.dataset is None:
        flag, given, source, dataset = "--calib-text", args.calib_text, args.calib_text, None
    else:
        flag, given, (source, dataset) = "--calib-dataset", args.calib_dataset, args.dataset
    try:
        tokens = text_tokens(source, tokenizer, *sampling)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"{flag} {given}: {exc}") from exc
    return tokens, describe_calibration(*sampling, split, args.calib_text, dataset)


def _compress(model, args: argparse.Namespace, calibration_set, options) -> dict:
    """Compress ``model`` in place with ``options`` (from :func:`_pbs2p_config`) on ``calibration_set`` (from
    :func:`_calibration_set`); describe what was done."""
    import dataclasses

    import torch

    from pbs2p.quantize import conversion_report, quantize_

    config, calibrate_options = options
    prefix, filter_fn = _decoder_linear_filter(model)
    originals = {name: mod.weight.detach().clone() for name, mod in model.named_modules()
                 if filter_fn(mod, name)}
    tokens, calibration = calibration_set
    output_errors = {}
    start = time.perf_counter()
    if tokens is not None:
        from pbs2p.pipeline import calibrate

        result = calibrate(model, tokens, config, progress=not args.no_progress, device=args.device,
                           **calibrate_options)
        for block in result.blocks:
            for name, err in block.errors.items():
                output_errors[f"{prefix}{block.index}.{name}"] = float(err)
    else:
        quantize_(model, config, filter_fn=filter_fn)
    wall = time.perf_counter() - start
    report = conversion_report(model, config, filter_fn)
    if report.skipped:
        print(f"pbs2p: warning: {len(report.skipped)} decoder linear(s) left uncompressed: "
              f"{report.skipped[:5]}", file=sys.stderr)
    per_layer = []
    for name, weight in report.converted:
        ref = originals[name]
        err = torch.linalg.vector_norm(ref - weight.dequantize(ref.dtype)) / torch.linalg.vector_norm(ref)
        layer = {"name": name, "n": weight.n, "m": weight.m, "weight_rel_error": float(err)}
        if name in output_errors:
            layer["output_rel_error"] = output_errors[name]
        per_layer.append(layer)
    if calibration and len(output_errors) != len(per_layer):
        raise CommandError(f"calibrate reported errors for {len(output_errors)} linears, "
                           f"but {len(per_layer)} were converted")
    config_dict = {k: v for k, v in dataclasses.asdict(config).items() if k != "step"}
    if calibration:
        config_dict["calibrate"] = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                    for k, v in calibrate_options.items()}
    calib = f"{args.nsamples}x{args.calib_seqlen} calib" if calibration else "data-free"
    return {
        "label": f"pbs2p {config.n}:{config.m} ({calib})",
        "config": config_dict,
        "nm": f"{config.n}:{config.m}",
        "method": "pbs2p-" + ("oneshot" if config.spbo_steps == 0 else "spbo") + ("" if calibration else "-datafree"),
        "bits_per_weight": report.bits_per_weight(),
        # the paper's convention: 1 bit per kept weight, nothing else (exact under per-block N from CFS)
        "bits_per_weight_kept": report.kept_fraction(),
        "per_layer": per_layer,
        "calibration": calibration,
        "compressed_linears": len(report.converted),
        "skipped_linears": [list(s) for s in report.skipped],
        "device": args.device,
        "dtype": args.dtype,
        "wall_s": wall,
    }


def _model_record(name: str, model) -> dict:
    from pbs2p_lab.assets import MODELS

    spec = MODELS.get(name)
    return {
        "name": name,
        "description": spec.description if spec else None,
        "source": {"wheel": spec.wheel, "member": spec.member, "sha256": spec.sha256} if spec else name,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _cmd_compress(args: argparse.Namespace) -> int:
    from pbs2p_lab.assets import check_output_folder, load_model, save_compressed
    from pbs2p_lab.data.split import load_split
    from pbs2p_lab.eval.results import result_header

    options = _pbs2p_config(args)  # refuse bad options before loading anything
    check_output_folder(args.out)  # and an output folder that could not be written, or must not be replaced
    _, dtype = _placement(args)
    model, tokenizer = load_model(args.model, dtype=dtype)  # stays on the CPU: calibrate moves blocks to --device
    split = load_split()
    info = _compress(model, args, _calibration_set(tokenizer, args, split), options)
    meta = {**result_header(), "model": _model_record(args.model, model), "split": split.describe(), **info}
    save_compressed(model, tokenizer, args.out, meta)
    print(f"compressed {info['compressed_linears']} linears ({info['nm']}, {info['method']}): "
          f"{info['bits_per_weight']:.3f} bits/weight, {info['wall_s']:.0f} s -> {args.out}")
    return 0


def _measure_kwargs(args: argparse.Namespace) -> dict:
    return {"seqlen": args.seqlen, "ppl_limit": args.ppl_limit, "tasks": args.tasks,
            "task_limit": args.limit, "batch_size": args.batch_size, "progress": not args.no_progress}


def _cmd_eval(args: argparse.Namespace) -> int:
    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.split import load_split
    from pbs2p_lab.eval.measure import measure_entry
    from pbs2p_lab.eval.results import result_header, write_result
    from pbs2p_lab.report import markdown_table

    if args.no_ppl and not args.tasks:
        print("pbs2p eval: nothing to do (--no-ppl and no --tasks)", file=sys.stderr)
        return 2
    if args.out:
        _check_output_file(args.out)
    meta = _compressed_meta(args.model) or {}
    device, dtype = _placement(args)
    if args.tasks:
        _check_tasks(args.tasks)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device)
    load_s = time.perf_counter() - start
    embeddings = _apply_embeddings(model, args)
    split = load_split()
    kwargs = _measure_kwargs(args)
    kwargs["measure_ppl"] = not args.no_ppl
    described = meta or _quantization_of(model) or {"label": _fp_label(args), "method": "fp"}
    if embeddings:
        described = {**described, "label": described["label"] + " + int8 embeddings"}
    known = {k: described.get(k) for k in ("nm", "config", "bits_per_weight", "bits_per_weight_kept", "per_layer")}
    entry = measure_entry(model, tokenizer, label=described["label"], method=described["method"],
                          split=split, wall_s={"load": load_s}, **known, **kwargs)
    model_record = {**meta["model"], "compressed_folder": args.model} if meta else _model_record(args.model, model)
    record = {**result_header(), "model": model_record, "split": split.describe(),
              "calibration": meta.get("calibration") if meta else None, "entries": [entry]}
    if embeddings:
        record["embeddings"] = embeddings
    if args.out:
        write_result(args.out, record)
    print(markdown_table([{"model": model_record["name"], **entry}]))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from pbs2p import Generator
    from pbs2p_lab.assets import load_model

    if args.cpp_wrapper and args.no_compile:
        raise CommandError("--cpp-wrapper applies to the compiled decode step: it cannot go with --no-compile")
    device, dtype = _placement(args)
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device).eval()
    _apply_embeddings(model, args)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise CommandError("--prompt gives no tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise CommandError(f"prompt ({ids.shape[1]} tokens) plus --max-new-tokens {args.max_new_tokens} exceed the "
                           f"model's {limit} positions")
    generator = Generator(model, ids.shape[1] + args.max_new_tokens, compile=not args.no_compile,
                          cpp_wrapper=args.cpp_wrapper)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)  # prints each word as its tokens complete it
    sys.stdout.write(args.prompt)
    out = generator(ids, args.max_new_tokens, eos_token_id=None if args.ignore_eos else tokenizer.eos_token_id,
                    on_token=lambda token: streamer.put(torch.tensor([token])))
    streamer.end()
    compiled = f", compile {out.compile_s:.1f} s" if out.compile_s else ""
    print(f"pbs2p generate: {len(out.tokens)} new tokens; prefill {ids.shape[1]} tokens in {out.prefill_s:.2f} s"
          f"{compiled}; decode {out.tokens_per_s:.1f} tokens/s ({out.decode_steps} steps, "
          f"{'eager' if args.no_compile else 'compiled' + (' with C++ wrapper' if args.cpp_wrapper else '')}, "
          f"{torch.get_num_threads()} threads, {device}, "
          f"{args.dtype})", file=sys.stderr)
    return 0


def _quantization_of(model) -> dict | None:
    """Label, method and bits of a loaded model from its own packed weights and ``quantization_config`` (for a
    folder without the record of ``pbs2p compress``); ``None`` for a model that is not quantized."""
    import dataclasses

    from pbs2p import PBS2P, conversion_report

    quantization = getattr(model.config, "quantization_config", None)
    report = conversion_report(model)
    if not report.converted:
        if quantization is None:
            return None
        method = getattr(quantization, "quant_method", None) or type(quantization).__name__
        kind = getattr(quantization, "quant_type", None)
        name = f"{method} {type(kind).__name__}" if kind is not None and not isinstance(kind, str | dict) else method
        return {"label": f"{name} (quantization_config)", "method": str(method)}
    config = getattr(quantization, "quant_type", None)
    patterns = sorted({(w.n, w.m) for _, w in report.converted})
    if isinstance(config, PBS2P):
        nm = f"{config.n}:{config.m}"
        config_dict = {k: v for k, v in dataclasses.asdict(config).items() if k != "step"}
    else:
        nm, config_dict = ",".join(f"{n}:{m}" for n, m in patterns), None
    return {"label": f"pbs2p {nm} (quantization_config)", "method": "pbs2p", "nm": nm, "config": config_dict,
            "bits_per_weight": report.bits_per_weight(), "bits_per_weight_kept": report.kept_fraction()}


def _compressed_meta(model_arg: str) -> dict | None:
    path = Path(model_arg).expanduser() / "pbs2p_compress.json"
    if not path.is_file():
        return None
    meta = _read_json(path, "the compressed folder's record")
    if not isinstance(meta.get("model"), dict):
        raise CommandError(f"{path} has no 'model' record: it was not written by pbs2p compress, or was edited")
    return meta


def _cmd_run(args: argparse.Namespace) -> int:
    from pbs2p_lab.assets import load_model
    from pbs2p_lab.data.split import load_split
    from pbs2p_lab.eval.measure import measure_entry
    from pbs2p_lab.eval.results import result_header, write_result
    from pbs2p_lab.report import markdown_table

    n, m = args.nm
    out = args.out or Path("runs") / f"run_{Path(args.model).name}_{n}of{m}.json"
    options = _pbs2p_config(args)  # refuse bad options before loading anything
    _check_output_file(out)
    device, dtype = _placement(args)
    if args.tasks:
        _check_tasks(args.tasks)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device)
    load_s = time.perf_counter() - start
    split = load_split()
    calibration_set = _calibration_set(tokenizer, args, split)
    kwargs = _measure_kwargs(args)
    windows = args.ppl_limit or "all"
    print(f"[1/3] FP perplexity on held-out text ({windows} windows of {args.seqlen})", file=sys.stderr)
    fp = measure_entry(model, tokenizer, label=_fp_label(args), method="fp", split=split,
                       wall_s={"load": load_s}, **kwargs)
    print(f"[2/3] compressing the decoder linears with PBS2P {n}:{m}", file=sys.stderr)
    info = _compress(model, args, calibration_set, options)
    print("[3/3] compressed perplexity", file=sys.stderr)
    compressed = measure_entry(
        model, tokenizer, label=info["label"], method=info["method"], split=split, nm=info["nm"],
        config=info["config"], bits_per_weight=info["bits_per_weight"],
        bits_per_weight_kept=info["bits_per_weight_kept"], per_layer=info["per_layer"],
        wall_s={"compress": info["wall_s"]}, **kwargs,
    )
    record = {**result_header(), "model": _model_record(args.model, model), "split": split.describe(),
              "calibration": info["calibration"], "entries": [fp, compressed]}
    write_result(out, record)
    print(markdown_table([{"model": args.model, **entry} for entry in (fp, compressed)]))
    print(f"\nresult: {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pbs2p_lab.report import write_report

    for path in args.files:  # every kind of result file the benchmarks write: an object or a list of records
        _read_json(path, "result file", records=True)
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} is a file; the report is a folder")
    readme = write_report(args.files, args.out)
    print(readme.read_text())
    print(f"written: {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
