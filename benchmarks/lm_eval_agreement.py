"""lm-eval's own command line against ``pbs2p eval`` on one compressed folder, task by task, same examples.

    pbs2p compress --model smollm2 --nm 4:8 --out runs/smollm2_4of8
    python benchmarks/lm_eval_agreement.py --model runs/smollm2_4of8 --tasks arc_easy,piqa,hellaswag --limit 200

Scores the folder twice on the same first ``--limit`` examples of each task: with ``pbs2p eval`` and with
``python -m pbs2p_lab.lm_eval run --model hf --model_args pretrained=FOLDER,dtype=float32 ...`` (lm-eval's
command line after ``import pbs2p``; the bundled offline tasks come in through ``--include_path``). Writes
every metric both report (``acc``, ``acc_norm``), whether they are equal, the two commands and the kernel path
to ``benchmarks/results/lm_eval/agreement_<folder name>.{json,md}``, and exits 1 if any metric differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "lm_eval"
METRICS = ("acc", "acc_norm")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # the bundled tasks are local; nothing to fetch


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, env={**OFFLINE, **os.environ})


def pbs2p_eval(folder: Path, tasks: list[str], limit: int, batch_size: int, work: Path) -> tuple[dict, list[str]]:
    """Per-task metrics of ``pbs2p eval`` (in a subprocess, as a user runs it) and its command line."""
    out = work / "pbs2p_eval.json"
    cmd = ["pbs2p", "eval", "--model", str(folder), "--no-ppl", "--tasks", ",".join(tasks), "--limit", str(limit),
           "--batch-size", str(batch_size), "--out", str(out), "--no-progress"]
    _run([sys.executable, "-m", "pbs2p_lab", *cmd[1:]])
    tasks_out = json.loads(out.read_text())["entries"][0]["zeroshot"]["tasks"]
    return {t: {k: v for k, v in r.items() if k in (*METRICS, "n")} for t, r in tasks_out.items()}, cmd


def lm_eval_run(folder: Path, tasks: list[str], limit: int, batch_size: int, work: Path) -> tuple[dict, list[str]]:
    """Per-task metrics of lm-eval's command line (``python -m pbs2p_lab.lm_eval``) and its command line."""
    from pbs2p_lab.eval.task_configs import prepare_tasks

    args = ["run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32", "--tasks", ",".join(tasks),
            "--include_path", str(prepare_tasks(tasks)), "--limit", str(limit), "--batch_size", str(batch_size),
            "--output_path", str(work / "lm_eval")]
    _run([sys.executable, "-m", "pbs2p_lab.lm_eval", *args])
    (path,) = (work / "lm_eval").rglob("results_*.json")
    got = json.loads(path.read_text())
    metrics = {}
    for task in tasks:
        row = got["results"][task]
        metrics[task] = {k: row[f"{k},none"] for k in METRICS if f"{k},none" in row}
        metrics[task]["n"] = got["n-samples"][task]["effective"]
    return metrics, ["python", "-m", "pbs2p_lab.lm_eval", *args]


def folder_record(folder: Path) -> dict | None:
    """How the folder was made, from the record ``pbs2p compress`` writes next to it (``None`` without one)."""
    path = folder / "pbs2p_compress.json"
    if not path.is_file():
        return None
    made = json.loads(path.read_text())
    return {k: made.get(k) for k in ("command", "label", "bits_per_weight", "calibration", "versions", "wall_s")}


def compare(ours: dict, theirs: dict) -> list[dict]:
    rows = []
    for task in ours:
        for metric in METRICS:
            if metric in ours[task] or metric in theirs[task]:
                a, b = ours[task].get(metric), theirs[task].get(metric)
                rows.append({"task": task, "metric": metric, "n": [ours[task]["n"], theirs[task]["n"]],
                             "pbs2p_eval": a, "lm_eval": b, "equal": a == b and ours[task]["n"] == theirs[task]["n"]})
    return rows


def write(record: dict, out: Path) -> Path:
    from pbs2p_lab.report import agreement_table

    out.mkdir(parents=True, exist_ok=True)
    stem = f"agreement_{Path(record['model']).name}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# lm-eval's command line vs `pbs2p eval` on `{Path(record['model']).name}`", "",
             f"`{record['command']}`. Kernel path: `{record['kernel_backend']}`."]
    made = record.get("compressed_by")
    if made:
        lines += ["", f"The folder: `{made['command']}` ({made['label']}, {made['bits_per_weight']:.3f} honest "
                  f"bits/weight, {made['wall_s']:.0f} s)."]
    lines += ["",
              f"- pbs2p eval: `{' '.join(record['pbs2p_eval_command'])}` ({record['pbs2p_eval_s']:.0f} s)",
              f"- lm-eval: `{' '.join(record['lm_eval_command'])}` ({record['lm_eval_s']:.0f} s)", "",
              agreement_table(record), "", f"All equal: **{'yes' if record['all_equal'] else 'no'}**."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out / f"{stem}.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a compressed folder (pbs2p compress --out)")
    p.add_argument("--tasks", default="arc_easy,piqa,hellaswag", help="comma-separated task names")
    p.add_argument("--limit", type=int, default=200, help="examples per task (the first ones)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there (give a folder written by pbs2p compress)")
    from pbs2p.kernels import ops
    from pbs2p_lab.eval.results import package_versions

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ours, ours_cmd = pbs2p_eval(args.model, tasks, args.limit, args.batch_size, Path(tmp))
        t1 = time.perf_counter()
        theirs, theirs_cmd = lm_eval_run(args.model, tasks, args.limit, args.batch_size, Path(tmp))
        t2 = time.perf_counter()
    rows = compare(ours, theirs)
    ours_cmd, theirs_cmd = ([c.replace(tmp, "$TMP") for c in cmd] for cmd in (ours_cmd, theirs_cmd))
    record = {"model": str(args.model), "compressed_by": folder_record(args.model),
              "tasks": tasks, "limit": args.limit, "batch_size": args.batch_size,
              "command": " ".join(["python", "benchmarks/lm_eval_agreement.py", *(argv or sys.argv[1:])]),
              "kernel_backend": ops.kernel_backend(), "versions": package_versions(),
              "pbs2p_eval_command": ours_cmd, "lm_eval_command": theirs_cmd,
              "pbs2p_eval_s": t1 - t0, "lm_eval_s": t2 - t1, "rows": rows, "all_equal": all(r["equal"] for r in rows)}
    print(write(record, args.out).read_text())
    return 0 if record["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
