"""``pbs2p.calibration_tokens``: calibration token ids from raw text, a text file, a list of strings or a
dataset (duck-typed), with clear refusals; ``calibrate`` refuses text and names the helper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import snapshot_state, tiny_llama

from pbs2p import PBS2P, calibrate, calibration_tokens
from pbs2p.pipeline.text import sample_segments

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "The quick brown fox jumps over the lazy dog; the five boxing wizards jump quickly. " * 8


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level tokenizer built offline: one token per UTF-8 byte, ids 0..255 (tiny_llama's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    backend = Tokenizer(models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


class Rows:
    """A dataset as ``datasets`` shapes one (duck-typed): column names, and rows as dicts when iterated."""

    def __init__(self, column_names, rows):
        self.column_names, self._rows = column_names, rows

    def __iter__(self):
        return iter(self._rows)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_every_kind_of_text_gives_the_same_seeded_windows(tokenizer, tmp_path):
    parts = [TEXT[:300], TEXT[300:]]
    joined = "\n\n".join(parts)
    expected = sample_segments(_ids(tokenizer, joined), 3, 64, seed=5)
    (tmp_path / "calib.txt").write_text(joined, encoding="utf-8")
    sources = {
        "raw text": joined,
        "text file": tmp_path / "calib.txt",
        "list of strings": parts,
        "tuple of strings": tuple(parts),
        "list of rows": [{"text": p, "id": i} for i, p in enumerate(parts)],
        "dataset": Rows(["id", "text"], [{"id": i, "text": p} for i, p in enumerate(parts)]),
        "generator": (p for p in parts),
    }
    for what, data in sources.items():
        tokens = calibration_tokens(data, tokenizer, nsamples=3, seqlen=64, seed=5)
        assert tokens.dtype == torch.int64 and torch.equal(tokens, expected), what
    other_seed = calibration_tokens(joined, tokenizer, nsamples=3, seqlen=64, seed=6)
    assert not torch.equal(other_seed, expected)
    rows = Rows(["body"], [{"body": p} for p in parts])
    assert torch.equal(calibration_tokens(rows, tokenizer, 3, 64, seed=5, column="body"), expected)


def test_a_datasets_dataset(tokenizer):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [TEXT[:300], TEXT[300:]], "label": [0, 1]})
    expected = calibration_tokens([TEXT[:300], TEXT[300:]], tokenizer, 2, 32, seed=1)
    assert torch.equal(calibration_tokens(ds, tokenizer, 2, 32, seed=1), expected)
    with pytest.raises(TypeError, match=r"splits \['train'\]: pick one"):
        calibration_tokens(datasets.DatasetDict({"train": ds}), tokenizer, 2, 32)
    with pytest.raises(ValueError, match=r"no 'content' column \(its columns: \['text', 'label'\]\)"):
        calibration_tokens(ds, tokenizer, 2, 32, column="content")


REFUSALS = {
    "empty text": ("", ValueError, "the calibration text is empty"),
    "blank text": ("  \n\t ", ValueError, "the calibration text is empty"),
    "empty list": ([], ValueError, "the calibration text is empty"),
    "too little text": ("a few words", ValueError,
                        r"has 11 tokens, fewer than nsamples x seqlen = 2 x 64 = 128"),
    "a number in the list": (["some text", 3], TypeError, "calibration item 1 has type int, not str"),
    "a row without the column": ([{"text": "x"}, {"body": "y"}], ValueError,
                                 r"row 1 has no 'text' column \(its keys: \['body'\]\)"),
    "a dataset without the column": (Rows(["body"], []), ValueError, r"no 'text' column \(its columns: \['body'\]\)"),
    "splits of a dataset": (Rows({"train": ["text"]}, []), TypeError, r"splits \['train'\]: pick one"),
    "one row": ({"text": TEXT}, TypeError, "pass the text, a list of texts, or one split"),
    "token ids": (torch.zeros(2, 64, dtype=torch.long), TypeError, "already a tensor"),
    "bytes": (TEXT.encode(), TypeError, "decode it to a str first"),
    "a number": (42, TypeError, "must be a str, a path to a text file, a list of strings or a dataset"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_data_is_refused_with_the_cause(tokenizer, case):
    data, kind, message = REFUSALS[case]
    with pytest.raises(kind, match=message):
        calibration_tokens(data, tokenizer, nsamples=2, seqlen=64)


def test_bad_files_and_options_are_refused(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration text file .*absent.txt does not exist"):
        calibration_tokens(tmp_path / "absent.txt", tokenizer, 1, 8)
    with pytest.raises(ValueError, match="is a folder, not a text file"):
        calibration_tokens(tmp_path, tokenizer, 1, 8)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        calibration_tokens(tmp_path / "latin1.txt", tokenizer, 1, 8)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match=r"a str is the text itself: to read the file .*pathlib.Path"):
        calibration_tokens(str(tmp_path / "short.txt"), tokenizer, 2, 64)
    for options, message in (({"nsamples": 0}, "nsamples must be an int >= 1"),
                             ({"seqlen": 2.5}, "seqlen must be an int >= 1"),
                             ({"seed": "0"}, "seed must be an int")):
        with pytest.raises(ValueError, match=message):
            calibration_tokens(TEXT, tokenizer, **options)
    with pytest.raises(TypeError, match="column must be a str"):
        calibration_tokens(TEXT, tokenizer, 1, 8, column=0)
    with pytest.raises(TypeError, match="tokenizer must be the model's tokenizer"):
        calibration_tokens(TEXT, "gpt2", 1, 8)


def test_calibrate_refuses_text_naming_the_helper_and_changes_nothing(tokenizer, tmp_path):
    model = tiny_llama()
    before = snapshot_state(model)
    (tmp_path / "t.txt").write_text(TEXT)
    for data in (TEXT, tmp_path / "t.txt", [TEXT], Rows(["text"], [{"text": TEXT}])):
        with pytest.raises(TypeError, match=r"calibrate takes token ids .*pbs2p.calibration_tokens\(data, tokenizer"):
            calibrate(model, data, PBS2P(n=4, m=8), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_calibrate_on_tokens_made_from_text(tokenizer):
    model = tiny_llama()
    tokens = calibration_tokens([TEXT, TEXT.upper()], tokenizer, nsamples=4, seqlen=32, seed=0)
    result = calibrate(model, tokens, PBS2P(n=4, m=8), progress=False, tuning=None)
    assert len(result.report.converted) == 14 and result.tokens == 4 * 32


def test_importing_pbs2p_does_not_import_datasets():
    code = "import sys, pbs2p; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[3]).stdout
    assert out.strip().splitlines()[-1] == "False"
