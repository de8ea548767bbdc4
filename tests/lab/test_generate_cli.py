"""``pbs2p generate`` on a compressed tiny model, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pbs2p import generate
from pbs2p_lab.assets import load_model
from pbs2p_lab.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "The history of"


def test_generate_from_a_compressed_folder_in_a_fresh_process(tmp_path):
    folder = tmp_path / "tiny48"
    assert main(["compress", "--model", "tiny", "--nsamples", "0", "--out", str(folder), "--no-progress"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pbs2p_lab", "generate", "--model", str(folder), "--prompt", PROMPT,
                           "--max-new-tokens", "6", "--ignore-eos", "--no-compile", "--embeddings", "int8"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_model(str(folder))
    from pbs2p import int8_embeddings_

    int8_embeddings_(model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    tokens = generate(model, ids, 6, compile=False).tokens
    assert done.stdout == PROMPT + tokenizer.decode(tokens, skip_special_tokens=True) + "\n"
    assert "6 new tokens" in done.stderr and "tokens/s (5 steps, eager" in done.stderr


def test_generate_refuses_bad_requests(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", "--embeddings", "int4"])
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "100000", "--no-compile"]) == 2
    assert "exceed the model's" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--no-compile", "--cpp-wrapper"]) == 2
    assert "cannot go with --no-compile" in capsys.readouterr().err


def test_eval_with_int8_embeddings_labels_and_records_it(tmp_path, tiny):
    from pbs2p_lab.eval.results import model_size_bytes

    out = tmp_path / "e.json"
    assert main(["eval", "--model", "tiny", "--seqlen", "64", "--ppl-limit", "2", "--embeddings", "int8",
                 "--out", str(out), "--no-progress"]) == 0
    import json

    record = json.loads(out.read_text())
    assert record["entries"][0]["label"] == "fp32 + int8 embeddings"
    emb = record["embeddings"]
    assert emb["format"].startswith("int8") and 0 < emb["bytes_after"] < emb["bytes_before"]
    fp_bytes = model_size_bytes(tiny[0])  # the int8 rows are buffers: counted in the size like parameters
    assert round(record["entries"][0]["size_mb"] * 1e6) == fp_bytes - emb["bytes_before"] + emb["bytes_after"]
