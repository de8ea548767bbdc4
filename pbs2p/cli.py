"""Command line: ``pbs2p {fetch,compress,eval,run,report}`` (also ``python -m pbs2p``).

``pbs2p run`` is the main job: load SmolLM2, measure FP perplexity on held-out Wikipedia text, compress
the decoder blocks' linears with PBS²P, measure again, print FP vs compressed and write a result JSON.
Embeddings and the LM head always stay in full precision.

Examples::

    pbs2p fetch                                    # download + verify every packaged asset once
    pbs2p run --nm 4:8 --nsamples 8 --ppl-limit 40 --out runs/smollm2_4of8.json
    pbs2p eval --model smollm2 --tasks default --limit 200 --out benchmarks/results/fp/smollm2.json
    pbs2p compress --model smollm2 --nm 6:8 --out runs/smollm2_6of8 && pbs2p eval --model runs/smollm2_6of8
    pbs2p report benchmarks/results/*/*.json --out benchmarks/report
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pbs2p.data.calibration import DEFAULT_NSAMPLES

__all__ = ["build_parser", "main"]


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N:M such as 4:8, got {text!r}") from exc
    return n, m


def _limit(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is a positive number or 'all'")
    return value


def _tasks(text: str) -> tuple[str, ...]:
    from pbs2p.eval.task_configs import AVAILABLE_TASKS, DEFAULT_TASKS

    if text == "none":
        return ()
    names = DEFAULT_TASKS if text == "default" else tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in AVAILABLE_TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; known: {', '.join(AVAILABLE_TASKS)}")
    return names


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="built-in alias (smollm2, tiny), a `pbs2p compress` folder, an HF folder or hub id")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


_SHARED_FIELDS = {"n", "m", "seed", "step", "version"}  # set through --nm and --seed, or internal


def _config_fields():
    """(name, type, default) of every PBS2P option the command line exposes, read from the dataclass."""
    import dataclasses
    import typing

    from pbs2p.config import PBS2P

    hints = typing.get_type_hints(PBS2P)
    for f in dataclasses.fields(PBS2P):
        if f.name in _SHARED_FIELDS or not f.init:
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        yield f.name, (args[0] if args else kind), f.default


def _add_compression(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression (options left unset keep PBS2P's defaults)")
    g.add_argument("--nm", type=_nm, default=(4, 8), help="N:M sparsity, e.g. 4:8, 6:8, 2:4 (default 4:8)")
    g.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES,
                   help=f"calibration segments of the calibration text; 0 = data-free quantize_ "
                        f"(default {DEFAULT_NSAMPLES})")
    g.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration segment")
    g.add_argument("--seed", type=int, default=0, help="calibration sampler and compression seed")
    for name, kind, default in _config_fields():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"PBS2P.{name} (default {default})")
        else:
            g.add_argument(flag, type=kind, default=None, help=f"PBS2P.{name} (default {default})")


def _add_measure(p: argparse.ArgumentParser, tasks_default: str) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--seqlen", type=int, default=2048, help="perplexity window (default 2048)")
    g.add_argument("--ppl-limit", type=_limit, default=None, help="max perplexity windows, or 'all'")
    g.add_argument("--tasks", type=_tasks, default=_tasks(tasks_default),
                   help=f"comma-separated zero-shot tasks, 'default' or 'none' (default {tasks_default})")
    g.add_argument("--limit", type=_limit, default=None, help="zero-shot examples per task, or 'all'")
    g.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``pbs2p`` command."""
    parser = argparse.ArgumentParser(prog="pbs2p", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download, verify and cache the packaged model/text/task assets")
    p.add_argument("what", nargs="*", default=["smollm2", "tiny", "text", "tasks"],
                   help="any of smollm2, tiny, text, tasks (default: all)")

    p = sub.add_parser("compress", help="compress a model's decoder linears and save it")
    _add_model(p)
    _add_compression(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (reload it with --model OUT)")

    p = sub.add_parser("eval", help="held-out perplexity and/or zero-shot tasks of a model")
    _add_model(p)
    _add_measure(p, tasks_default="none")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--out", type=Path, help="result JSON to write")

    p = sub.add_parser("run", help="FP vs PBS2P on SmolLM2: perplexity, bits/weight, size, time")
    _add_model(p)
    _add_compression(p)
    _add_measure(p, tasks_default="none")
    p.set_defaults(ppl_limit=40)
    p.add_argument("--out", type=Path, help="result JSON (default runs/run_<model>_<N>of<M>.json)")

    p = sub.add_parser("report", help="markdown table + plots from result JSONs")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/report"), help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pbs2p`` and ``python -m pbs2p``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from pbs2p.assets import AssetError

    commands = {"fetch": _cmd_fetch, "compress": _cmd_compress, "eval": _cmd_eval, "run": _cmd_run,
                "report": _cmd_report}
    try:
        return commands[args.command](args)
    except (AssetError, CommandError) as exc:
        print(f"pbs2p: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------- commands
class CommandError(RuntimeError):
    """A problem with what the user asked for, reported as one line (exit status 2)."""


def _cmd_fetch(args: argparse.Namespace) -> int:
    from pbs2p.assets import model_dir

    for what in args.what:
        if what in ("smollm2", "tiny"):
            print(f"{what}: {model_dir(what)}")
        elif what == "text":
            from pbs2p.data.split import load_split

            split = load_split()
            print(f"text: {len(split.calibration)} calibration + {len(split.heldout)} held-out articles")
        elif what == "tasks":
            from pbs2p.eval.task_configs import AVAILABLE_TASKS, prepare_tasks

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
    from pbs2p.config import PBS2P

    n, m = args.nm
    options = {name: getattr(args, name) for name, _, _ in _config_fields()}
    options = {name: value for name, value in options.items() if value is not None}
    try:
        return PBS2P(n=n, m=m, seed=args.seed, **options)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"invalid compression options: {exc}") from exc


def _compress(model, tokenizer, args: argparse.Namespace, split) -> dict:
    """Compress ``model`` in place; return what the result entry needs to know about it."""
    import dataclasses

    import torch

    from pbs2p.data.calibration import calibration_tokens, describe_calibration
    from pbs2p.quantize import conversion_report, quantize_

    config = _pbs2p_config(args)
    prefix, filter_fn = _decoder_linear_filter(model)
    originals = {name: mod.weight.detach().clone() for name, mod in model.named_modules()
                 if filter_fn(mod, name)}
    calibration, output_errors = None, {}
    start = time.perf_counter()
    if args.nsamples > 0:
        from pbs2p.pipeline import calibrate

        tokens = calibration_tokens(tokenizer, args.nsamples, args.calib_seqlen, args.seed, split)
        calibration = describe_calibration(args.nsamples, args.calib_seqlen, args.seed, split)
        result = calibrate(model, tokens, config, progress=not args.no_progress)
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
    calib = f"{args.nsamples}x{args.calib_seqlen} calib" if calibration else "data-free"
    return {
        "label": f"pbs2p {config.n}:{config.m} ({calib})",
        "config": config_dict,
        "nm": f"{config.n}:{config.m}",
        "method": "pbs2p-" + config.method + ("" if calibration else "-datafree"),
        "bits_per_weight": report.bits_per_weight(),
        # the paper's convention: 1 bit per kept weight, nothing else (exact under per-block N from CFS)
        "bits_per_weight_kept": sum(w.numel() * w.n / w.m for _, w in report.converted) / report.num_weights,
        "per_layer": per_layer,
        "calibration": calibration,
        "compressed_linears": len(report.converted),
        "skipped_linears": [list(s) for s in report.skipped],
        "wall_s": wall,
    }


def _model_record(name: str, model) -> dict:
    from pbs2p.assets import MODELS

    spec = MODELS.get(name)
    return {
        "name": name,
        "description": spec.description if spec else None,
        "source": {"wheel": spec.wheel, "member": spec.member, "sha256": spec.sha256} if spec else name,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _cmd_compress(args: argparse.Namespace) -> int:
    from pbs2p.assets import load_model, save_compressed
    from pbs2p.data.split import load_split
    from pbs2p.eval.results import result_header

    model, tokenizer = load_model(args.model)
    split = load_split()
    info = _compress(model, tokenizer, args, split)
    meta = {**result_header(), "model": _model_record(args.model, model), "split": split.describe(), **info}
    save_compressed(model, tokenizer, args.out, meta)
    print(f"compressed {info['compressed_linears']} linears ({info['nm']}, {info['method']}): "
          f"{info['bits_per_weight']:.3f} bits/weight, {info['wall_s']:.0f} s -> {args.out}")
    return 0


def _measure_kwargs(args: argparse.Namespace) -> dict:
    return {"seqlen": args.seqlen, "ppl_limit": args.ppl_limit, "tasks": args.tasks,
            "task_limit": args.limit, "batch_size": args.batch_size, "progress": not args.no_progress}


def _cmd_eval(args: argparse.Namespace) -> int:
    from pbs2p.assets import load_model
    from pbs2p.data.split import load_split
    from pbs2p.eval.measure import measure_entry
    from pbs2p.eval.results import result_header, write_result
    from pbs2p.report import markdown_table

    if args.no_ppl and not args.tasks:
        print("pbs2p eval: nothing to do (--no-ppl and no --tasks)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - start
    split = load_split()
    meta = _compressed_meta(args.model) or {}
    kwargs = _measure_kwargs(args)
    kwargs["measure_ppl"] = not args.no_ppl
    known = {k: meta.get(k) for k in ("nm", "config", "bits_per_weight", "bits_per_weight_kept", "per_layer")}
    entry = measure_entry(model, tokenizer, label=meta.get("label", "fp32"), method=meta.get("method", "fp"),
                          split=split, wall_s={"load": load_s}, **known, **kwargs)
    model_record = {**meta["model"], "compressed_folder": args.model} if meta else _model_record(args.model, model)
    record = {**result_header(), "model": model_record, "split": split.describe(),
              "calibration": meta.get("calibration") if meta else None, "entries": [entry]}
    if args.out:
        write_result(args.out, record)
    print(markdown_table([{"model": model_record["name"], **entry}]))
    return 0


def _compressed_meta(model_arg: str) -> dict | None:
    import json

    path = Path(model_arg) / "pbs2p_compress.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _cmd_run(args: argparse.Namespace) -> int:
    from pbs2p.assets import load_model
    from pbs2p.data.split import load_split
    from pbs2p.eval.measure import measure_entry
    from pbs2p.eval.results import result_header, write_result
    from pbs2p.report import markdown_table

    n, m = args.nm
    out = args.out or Path("runs") / f"run_{Path(args.model).name}_{n}of{m}.json"
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - start
    split = load_split()
    kwargs = _measure_kwargs(args)
    windows = args.ppl_limit or "all"
    print(f"[1/3] FP perplexity on held-out text ({windows} windows of {args.seqlen})", file=sys.stderr)
    fp = measure_entry(model, tokenizer, label="fp32", method="fp", split=split,
                       wall_s={"load": load_s}, **kwargs)
    print(f"[2/3] compressing the decoder linears with PBS2P {n}:{m}", file=sys.stderr)
    info = _compress(model, tokenizer, args, split)
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
    from pbs2p.report import write_report

    readme = write_report(args.files, args.out)
    print(readme.read_text())
    print(f"written: {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
