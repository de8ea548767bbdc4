"""Saving a compressed model is atomic: the output folder is the old one or the new one, never a mix, even when
the save fails or the process is killed (``kill -9``) halfway; folders that are not ours are never replaced."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

import pbs2p
from pbs2p import PBS2P
from pbs2p_lab.assets import load_model, save_compressed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tokenizer:
    """The one method of a tokenizer that ``save_compressed`` calls."""

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        Path(folder, "tokenizer.json").write_text('{"stub": true}')


def compressed(n: int, m: int) -> torch.nn.Module:
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=n, m=m),
                    filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and ".layers." in name)
    return model


def snapshot(folder: Path) -> dict[str, str]:
    """A digest of every file; of a safetensors file, of its tensors and metadata (its header order varies)."""
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    if path.suffix != ".safetensors":
        digest.update(path.read_bytes())
        return digest.hexdigest()
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
            for key in sorted(f.keys()):
                tensor = f.get_tensor(key)
                digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    except Exception as exc:  # a damaged file: its bytes (and the error)
        digest.update(f"unreadable {type(exc).__name__}".encode() + path.read_bytes())
    return digest.hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.pbs2p-")
                  and not p.name.endswith("-lock"))


def test_save_over_an_earlier_save_replaces_it_whole(tmp_path):
    out = tmp_path / "out"
    save_compressed(compressed(4, 8), Tokenizer(), out, {"nm": "4:8"})
    (out / "extra-old-file.txt").write_text("from the old folder")
    save_compressed(compressed(2, 4), Tokenizer(), out, {"nm": "2:4"})
    assert not (out / "extra-old-file.txt").exists() and leftovers(out) == []
    assert json.loads((out / "pbs2p_compress.json").read_text()) == {"nm": "2:4"}
    model, _ = _load(out)
    assert model.model.layers[0].mlp.up_proj.weight.nm() == (2, 4)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder), None


@pytest.mark.parametrize("fails_in", ["model", "tokenizer"])
def test_a_failed_save_leaves_the_old_folder_as_it_was(tmp_path, fails_in):
    out = tmp_path / "out"
    save_compressed(compressed(4, 8), Tokenizer(), out, {"nm": "4:8"})
    before = snapshot(out)

    class Broken(Tokenizer):
        def save_pretrained(self, folder):
            raise OSError("disk full (simulated)")

    model = compressed(2, 4)
    if fails_in == "model":
        model.save_pretrained = Broken().save_pretrained
    with pytest.raises(OSError, match="simulated"):
        save_compressed(model, Broken() if fails_in == "tokenizer" else Tokenizer(), out, {"nm": "2:4"})
    assert snapshot(out) == before and leftovers(out) == []


@pytest.mark.parametrize("kind", ["file", "foreign-folder", "under-a-file"])
def test_output_folders_that_are_not_ours_are_refused_before_any_work(tmp_path, kind):
    from pbs2p_lab.assets import OutputFolderError, check_output_folder

    target = tmp_path / "target"
    if kind == "file":
        target.write_text("my notes")
    elif kind == "foreign-folder":
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
    else:
        (tmp_path / "a-file").write_text("x")
        target = tmp_path / "a-file" / "out"
    before = snapshot(tmp_path)
    with pytest.raises(OutputFolderError, match="file|not written by pbs2p compress"):
        check_output_folder(target)
    with pytest.raises(OutputFolderError):
        save_compressed(compressed(4, 8), Tokenizer(), target, {})
    assert snapshot(tmp_path) == before


def test_empty_and_new_folders_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        save_compressed(compressed(4, 8), Tokenizer(), target, {"ok": 1})
        assert (target / "pbs2p_compress.json").is_file() and leftovers(target) == []


SAVER = """
import os, sys, time
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
sys.path.insert(0, {tests!r})
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
from test_saves import Tokenizer, compressed
from pbs2p_lab.assets import save_compressed
model = compressed(2, 4)
print("READY", flush=True)
start = time.perf_counter()
save_compressed(model, Tokenizer(), sys.argv[1], {{"nm": "2:4"}})
print("SAVED", time.perf_counter() - start, flush=True)
"""


def run_saver(out: Path, kill_after: float | None) -> float | None:
    """Save the 2:4 model over ``out`` in a new process; SIGKILL it ``kill_after`` seconds into the save."""
    code = textwrap.dedent(SAVER.format(tests=str(Path(__file__).parents[1]), here=str(Path(__file__).parent)))
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("READY")
    if kill_after is None:
        line = proc.stdout.readline()
        assert proc.wait(timeout=300) == 0
        return float(line.split()[1])
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return None


def test_kill_9_during_a_save_leaves_old_or_new_never_a_mix(tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    save_compressed(compressed(4, 8), Tokenizer(), out, {"nm": "4:8"})
    old = snapshot(out)
    seconds = run_saver(reference, None)
    new = snapshot(reference)
    assert old != new
    outcomes = []
    for fraction in (0.2, 0.5, 0.8):
        run_saver(out, fraction * seconds)
        now = snapshot(out)
        outcomes.append("old" if now == old else "new" if now == new else "mix")
        if now == new:  # start the next trial from the old folder again
            save_compressed(compressed(4, 8), Tokenizer(), out, {"nm": "4:8"})
    assert "mix" not in outcomes, outcomes
    save_compressed(compressed(2, 4), Tokenizer(), out, {"nm": "2:4"})  # stale staging folders are cleaned
    assert snapshot(out) == new and leftovers(out) == []


def test_load_model_of_a_damaged_compressed_folder_is_one_clear_error(tmp_path):
    from pbs2p_lab.assets import AssetCorruptError

    out = tmp_path / "out"
    save_compressed(compressed(4, 8), Tokenizer(), out, {"nm": "4:8"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(AssetCorruptError, match="quantization_config"):
        load_model(str(out))
