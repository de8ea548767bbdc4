"""Perplexity against a straightforward reference, offline lm-eval tasks, result records."""

from __future__ import annotations

import math

import pytest
import torch

from pbs2p_lab.eval.perplexity import heldout_perplexity, perplexity
from pbs2p_lab.eval.task_configs import AVAILABLE_TASKS, DEFAULT_TASKS, prepare_tasks, task_template

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_ppl(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """Token by token: -log p(x_t | x_<t) inside each window, summed in float64, averaged, exponentiated."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seqlen : (w + 1) * seqlen]
            logprobs = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
            for t in range(1, seqlen):
                total -= float(logprobs[t - 1, chunk[t]])
                count += 1
    return math.exp(total / count)


def test_perplexity_equals_reference(tiny):
    model, tok = tiny
    from pbs2p_lab.data.calibration import tokenize_text
    from pbs2p_lab.data.split import load_split

    ids = tokenize_text(tok, load_split().heldout_text)[:1000]
    result = perplexity(model, ids, seqlen=128, limit=3, progress=False)
    assert result.windows == 3 and result.available_windows == 1000 // 128
    assert result.predicted_tokens == 3 * 127 and len(result.window_nll) == 3
    assert result.ppl == pytest.approx(_reference_ppl(model, ids, 128, 3), rel=1e-5)
    full = perplexity(model, ids, seqlen=128, progress=False)
    assert full.windows == 7 and full.ppl == pytest.approx(_reference_ppl(model, ids, 128, 7), rel=1e-5)


def test_perplexity_of_a_known_model():
    """A model that predicts uniformly over V tokens has perplexity exactly V."""

    class Uniform(torch.nn.Module):
        def __init__(self, vocab: int):
            super().__init__()
            self.vocab = vocab
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()

    result = perplexity(Uniform(37), torch.randint(0, 37, (500,)), seqlen=50, progress=False)
    assert result.ppl == pytest.approx(37.0, rel=1e-6) and result.windows == 10


def test_perplexity_rejects_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="do not fill one window"):
        perplexity(model, torch.arange(10), seqlen=64)
    with pytest.raises(ValueError, match="limit"):
        perplexity(model, torch.arange(100), seqlen=8, limit=0)


def test_heldout_perplexity_runs(tiny):
    model, tok = tiny
    result = heldout_perplexity(model, tok, seqlen=64, limit=2, progress=False)
    assert result.windows == 2 and math.isfinite(result.ppl) and result.ppl > 1


def test_task_templates_cover_the_paper_suite():
    paper_suite = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa",
                   "rte")
    for name in paper_suite:
        assert name in DEFAULT_TASKS and name in AVAILABLE_TASKS
        cfg = task_template(name)
        assert cfg["task"] == name and cfg["dataset_path"] == "arrow" and len(cfg["pbs2p_sha256"]) == 64
        assert cfg["test_split"] is None and cfg["validation_split"] == "validation"
    with pytest.raises(KeyError, match="available"):
        task_template("mmlu")


def test_tasks_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    names = [t for t in AVAILABLE_TASKS if t != "hellaswag"]  # hellaswag: same path, slow preprocessing
    manager = TaskManager(include_path=str(prepare_tasks(names)), include_defaults=False)
    loaded = manager.load(names)["tasks"]
    assert sorted(loaded) == sorted(names)
    for name, task in loaded.items():
        docs = list(task.validation_docs())
        assert len(docs) >= 100, name
        for doc in docs[:20]:
            choices = task.doc_to_choice(doc)
            if task.multiple_input:  # winogrande: the choices are contexts, doc_to_text is the gold index
                index = task.doc_to_text(doc)
            else:
                target = task.doc_to_target(doc)
                index = choices.index(target) if isinstance(target, str) else target
            assert 0 <= index < len(choices), (name, doc)


def test_boolq_targets_follow_the_boolean_answer(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(prepare_tasks(["boolq"])), include_defaults=False)
    task = manager.load(["boolq"])["tasks"]["boolq"]
    docs = list(task.validation_docs())[:50]
    assert [task.doc_to_target(d) for d in docs] == [int(d["answer"]) for d in docs]
    assert 0 < sum(d["answer"] for d in docs) < 50


def test_zeroshot_on_tiny_model(tiny):
    from pbs2p_lab.eval.zeroshot import evaluate_tasks

    model, tok = tiny
    result = evaluate_tasks(model, tok, ["piqa", "arc_easy"], limit=4, batch_size=4)
    assert set(result["tasks"]) == {"piqa", "arc_easy"}
    for row in result["tasks"].values():
        assert row["n"] == 4 and 0.0 <= row["acc"] <= 1.0 and "acc_norm" in row
    assert result["limit"] == 4 and result["split"] == "validation"
