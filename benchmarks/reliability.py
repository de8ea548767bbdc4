"""Reliability probes: how pbs2p handles what an adversarial user (or a bad day) does to it, with figures by area.

    python benchmarks/reliability.py [--kill-trials 20] [--build-trials 3] [--fuzz-examples 300]
                                     [--kernel-examples 600] [--seed 0] [--skip-fast]

A probe is one adversarial input with one right outcome: the right result, or a refusal that names the
cause (and leaves the user's model and files as they were). It is *clean* when that happens and *bad*
otherwise (a wrong result without an error, an unclear error, a crash).

* Fast probes: the test suite ``tests/reliability`` (run by CI), one probe per test case, grouped by module.
* Slow probes, here only:

  - ``kill -9`` at a random point of ``pbs2p compress --out X`` over an existing ``X`` (half of the trials
    anywhere in the run, half inside the save): ``X`` must be the old folder or the new one, never a mix;
  - the native build killed at a random point, then a new process on the same cache: it must load a
    verified library and compute correctly; three processes building at once on an empty cache: all
    load it, one compiles; a truncated cached library with a working compiler: rebuilt, never loaded;
  - a hypothesis fuzz of a saved checkpoint's bytes and safetensors metadata: every load must refuse with
    pbs2p's refusal (which names the tensor or file and the problem) or give exactly the original logits;
  - the kernel accuracy contract (``pbs2p.kernels.ops.TOLERANCE``) against the exact float64 product,
    hypothesis examples on every path (torch, each native ISA, the BLAS paths).

Writes ``benchmarks/results/reliability/reliability.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's CUDA-only .so files

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reliability"
PYTHON = sys.executable
AREAS = {
    "test_checkpoints": "checkpoints: damaged or incomplete files, fresh-process loads",
    "test_kernels": "kernels: fp64 contract, NaN/Inf rule, integer inputs, build and compile caches",
    "test_tensor_ops": "packed tensor ops in grad / no_grad / inference_mode, edited scales",
    "test_saves": "atomic saves, output folders",
    "test_cli_refusals": "command line refusals",
    "test_calibration_checks": "calibration inputs (already packed, meta, out of vocabulary)",
}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "PYTHONUNBUFFERED": "1", **extra}


# ------------------------------------------------------------------------------------------- fast probes
def fast_probes(workdir: Path) -> dict:
    """Run ``tests/reliability`` with pytest; one probe per test case, by module."""
    junit = workdir / "junit.xml"
    start = time.perf_counter()
    proc = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           str(ROOT / "tests" / "reliability")], cwd=ROOT, env=_env(), capture_output=True, text=True)
    areas: dict[str, Counter] = defaultdict(Counter)
    bad: list[str] = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        children = {child.tag for child in case}
        skipped = case.find("skipped")
        if "failure" in children or "error" in children:
            outcome = "bad"
            bad.append(f"{module}::{case.get('name')}")
        elif skipped is not None:
            outcome = "pending" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            outcome = "clean"
        areas[module][outcome] += 1
    return {"seconds": time.perf_counter() - start, "pytest_exit": proc.returncode, "bad": bad,
            "areas": {m: dict(c) for m, c in sorted(areas.items())}, "tail": proc.stdout.strip().splitlines()[-3:]}


# ------------------------------------------------------------------------------------------- kill -9 trials
def _digest(path: Path) -> str:
    """A file's digest; a safetensors file's by its tensors and metadata (the header order varies by process)."""
    digest = hashlib.sha256()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
                for key in sorted(f.keys()):  # noqa: SIM118 (safe_open is no dict)
                    tensor = f.get_tensor(key)
                    digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            return digest.hexdigest()
        except Exception as exc:  # noqa: BLE001 (a damaged file is a finding, not a crash)
            digest.update(f"unreadable {type(exc).__name__}".encode())
    digest.update(path.read_bytes())
    return digest.hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _compress_cmd(out: Path, nm: str) -> list[str]:
    return [PYTHON, "-m", "pbs2p_lab", "compress", "--model", "tiny", "--nsamples", "0", "--nm", nm,
            "--out", str(out), "--no-progress"]


def _classify(folder: Path, old: dict[str, str], new: dict[str, str], new_meta: dict) -> str:
    now = snapshot(folder)
    if now == old:
        return "old"
    if set(now) != set(new) or any(now[k] != new[k] for k in new if k != "pbs2p_compress.json"):
        return "mix" if now else "missing"
    try:
        meta = json.loads((folder / "pbs2p_compress.json").read_text())
    except ValueError:
        return "mix"
    return "new" if meta.get("nm") == new_meta["nm"] and meta.get("per_layer") == new_meta["per_layer"] else "mix"


def kill_trials(workdir: Path, trials: int, rng: random.Random) -> dict:
    """``kill -9`` at a random point of ``pbs2p compress --out X`` (2:4) over an existing ``X`` (4:8)."""
    root = workdir / "kill"
    root.mkdir()
    old_folder, reference = root / "old", root / "reference"
    subprocess.run(_compress_cmd(old_folder, "4:8"), env=_env(), check=True, capture_output=True)
    start = time.perf_counter()
    subprocess.run(_compress_cmd(reference, "2:4"), env=_env(), check=True, capture_output=True)
    run_seconds = time.perf_counter() - start
    old, new = snapshot(old_folder), snapshot(reference)
    new_meta = json.loads((reference / "pbs2p_compress.json").read_text())
    target = root / "X"
    # how long the save takes: from its staging folder's appearance to the end of the process
    shutil.copytree(old_folder, target)
    proc = subprocess.Popen(_compress_cmd(target, "2:4"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    staged = _wait_for_staging(target, proc)
    while proc.poll() is None and any(target.parent.glob(f".{target.name}.pbs2p-new-*")):
        time.sleep(0.002)  # until the staging folder is swapped in
    save_seconds = time.perf_counter() - staged if staged else 0.5
    proc.wait()
    outcomes, records = Counter(), []
    for trial in range(trials):
        shutil.rmtree(target, ignore_errors=True)
        for stale in root.glob(".X.pbs2p-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        shutil.copytree(old_folder, target)
        during_save = trial % 2 == 1
        proc = subprocess.Popen(_compress_cmd(target, "2:4"), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        if during_save:
            staged = _wait_for_staging(target, proc)
            delay = rng.uniform(0, 1.2 * save_seconds)  # the save, and a little after its swap
            if staged:
                time.sleep(max(0.0, staged + delay - time.perf_counter()))
        else:
            delay = rng.uniform(0, run_seconds)
            time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcome = _classify(target, old, new, new_meta)
        outcomes[outcome] += 1
        records.append({"trial": trial, "window": "save" if during_save else "run", "kill_at_s": round(
            time.perf_counter() - t0, 3), "finished_before_kill": finished, "outcome": outcome})
    return {"trials": trials, "run_seconds": run_seconds, "save_seconds": save_seconds,
            "outcomes": dict(outcomes), "bad": outcomes["mix"] + outcomes["missing"], "records": records}


def _wait_for_staging(target: Path, proc: subprocess.Popen) -> float | None:
    """When ``save_compressed``'s staging folder for ``target`` appears (``None`` if the process ends first)."""
    while proc.poll() is None:
        if any(target.parent.glob(f".{target.name}.pbs2p-new-*")):
            return time.perf_counter()
        time.sleep(0.002)
    return None


# ------------------------------------------------------------------------------------------- native builds
BUILD = """
import json, time, torch
from torch.utils import cpp_extension
from pbs2p.kernels import native, ops, packing, reference
torch.manual_seed(0)
start = time.perf_counter()
ok = native.load()
seconds = time.perf_counter() - start
result = {"native": ok, "compiled": bool(cpp_extension.JIT_EXTENSION_VERSIONER.entries), "seconds": seconds}
if ok:
    mask = torch.rand(70, 8, 8).argsort(-1) < 4
    codes = packing.pack(mask.reshape(70, 64), torch.rand(70, 64) > 0.5, 4, 8)
    alpha, mu, x = torch.rand(70, 1) + 0.1, 0.1 * torch.randn(70, 1), torch.randn(5, 64)
    y = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, None, 4, 8, 64)
    result["correct"] = reference.contract_ratio(y, x, codes, alpha, mu, None, 4, 8, 64, 2e-5) <= 1
    result["verified"] = native.verified_library() is not None
print("RESULT", json.dumps(result), flush=True)
"""


def _build_process(cache: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", textwrap.dedent(BUILD)], env=_env(PBS2P_KERNEL_CACHE=str(cache), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=1800)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"exit": proc.returncode, "stderr": err[-1500:]}
    return {**json.loads(lines[-1][7:]), "exit": 0, "warned": "do not match their build record" in err}


def build_trials(workdir: Path, trials: int, rng: random.Random) -> dict:
    """Interrupted builds, concurrent builds, a truncated cached library (each on a cache of its own)."""
    root = workdir / "builds"
    first = _result(_build_process(root / "reference"))
    build_seconds = first.get("seconds", 60.0)
    records = [{"probe": "clean build", **first, "clean": bool(first.get("native") and first.get("correct"))}]
    for trial in range(trials):
        cache = root / f"interrupted-{trial}"
        proc = _build_process(cache)
        delay = rng.uniform(0.5, build_seconds)
        time.sleep(delay)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the compiler and ninja it started
        after = _result(_build_process(cache))
        records.append({"probe": f"build killed after {delay:.1f} s", "killed_mid_build": killed, **after,
                        "clean": bool(after.get("native") and after.get("correct") and after.get("verified"))})
    cache = root / "concurrent"
    results = [_result(p) for p in [_build_process(cache) for _ in range(3)]]
    compiled = sum(bool(r.get("compiled")) for r in results)
    records.append({"probe": "3 processes build at once", "compiled": compiled, "results": results,
                    "clean": compiled == 1 and all(r.get("native") and r.get("correct") for r in results)})
    library = next(cache.glob("*/pbs2p_kernels_*.so"))
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    after = _result(_build_process(cache))
    records.append({"probe": "truncated cached library, compiler present", **after,
                    "clean": bool(after.get("native") and after.get("correct") and after.get("compiled")
                                  and after.get("warned") and after.get("verified"))})
    return {"build_seconds": build_seconds, "records": records, "probes": len(records),
            "bad": sum(not r["clean"] for r in records)}


# ------------------------------------------------------------------------------------------- checkpoint fuzz
WORKER = """
import json, os, sys
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
import torch, pbs2p
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_error()
torch.set_num_threads(1)
ids = torch.arange(12).reshape(1, 12)
for line in sys.stdin:
    folder = line.strip()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits = model(ids).logits
        out = {"loaded": True, "digest": logits.double().sum().item(), "exact": logits.flatten().tolist()[:256]}
    except Exception as exc:
        out = {"loaded": False, "type": type(exc).__name__, "message": str(exc)[:400]}
    print("OUT " + json.dumps(out), flush=True)
"""
CLEAR_ERRORS = ("ValueError", "RuntimeError", "OSError", "SafetensorError", "HeaderTooLarge", "FileNotFoundError")
#: how every refusal of a damaged PBS2P checkpoint begins (``pbs2p.interop.REFUSAL``); it goes on to name the tensor
#: or file and what is wrong with it. Any other error (e.g. transformers' "Invalid torchao safetensors metadata")
#: names nothing, and counts as bad.
REFUSAL = "refusing this pbs2p checkpoint, it is damaged or incomplete: "


class Loader:
    """A long-lived process that loads checkpoint folders; restarted if a load kills it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def load(self, folder: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([PYTHON, "-c", textwrap.dedent(WORKER)], env=_env(), text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.proc.stdin.write(f"{folder}\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("OUT "):
                return json.loads(line[4:])
        code = self.proc.wait()
        self.proc = None
        return {"loaded": False, "type": "crash", "message": f"the loading process died (exit {code})"}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def fuzz_checkpoints(workdir: Path, examples: int, seed: int) -> dict:
    """Hypothesis over a saved checkpoint: byte edits of its safetensors file, edits of its metadata."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
    from safetensors import safe_open
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_llama

    import pbs2p
    from pbs2p import PBS2P

    root = workdir / "fuzz"
    root.mkdir()
    model = tiny_llama()
    pbs2p.quantize_(model, PBS2P(n=4, m=8),
                    filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name != "lm_head")
    good = root / "good"
    model.save_pretrained(good)
    data = (good / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    with safe_open(good / "model.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    loader = Loader()
    original = loader.load(good)
    assert original["loaded"], original
    outcomes: Counter = Counter()
    errors: Counter = Counter()
    samples: dict[str, str] = {}
    bad: list[dict] = []
    counter = iter(range(10**9))

    def judge(kind: str, folder: Path, what: str) -> None:
        result = loader.load(folder)
        if result["loaded"]:
            outcome = "clean: loads, identical" if result["exact"] == original["exact"] else "bad: loads, different"
        elif result["type"] in CLEAR_ERRORS and REFUSAL in result["message"]:
            outcome = "clean: refused"
            cause = _cause(result["message"])
            errors[f"{result['type']}: {cause}"] += 1
            samples.setdefault(f"{result['type']}: {cause}", f"{what} -> {result['message'][:300]}")
        else:
            outcome = f"bad: {result['type']}"
        outcomes[(kind, outcome)] += 1
        if outcome.startswith("bad"):
            bad.append({"kind": kind, "edit": what, **{k: v for k, v in result.items() if k != "exact"}})
        shutil.rmtree(folder)

    def copy() -> Path:
        folder = root / f"case{next(counter)}"
        shutil.copytree(good, folder)
        return folder

    edits = st.sampled_from(["flip", "set", "truncate", "insert", "delete"])
    # half the edits inside the header (JSON, metadata), half in the tensor data
    offsets = st.one_of(st.integers(0, header_end - 1), st.integers(header_end, len(data) - 1))
    quiet = settings(max_examples=examples // 2, deadline=None, database=None, derandomize=False,
                     suppress_health_check=list(HealthCheck), print_blob=False)

    @hypothesis_seed(seed)
    @quiet
    @given(edit=edits, offset=offsets, value=st.integers(0, 255), bit=st.integers(0, 7))
    def byte_edits(edit, offset, value, bit):
        blob = bytearray(data)
        if edit == "flip":
            blob[offset] ^= 1 << bit
        elif edit == "set":
            blob[offset] = value
        elif edit == "truncate":
            del blob[offset:]
        elif edit == "insert":
            blob[offset:offset] = bytes([value])
        else:
            del blob[offset]
        if bytes(blob) == data:
            return
        folder = copy()
        (folder / "model.safetensors").write_bytes(bytes(blob))
        judge("bytes", folder, f"{edit} at {offset} ({'header' if offset < header_end else 'data'})")

    packed = [k for k, v in metadata.items() if k != "tensor_names" and '"BinarySparseTensor"' in v]
    json_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=8),
                            st.lists(st.integers(0, 4), max_size=3))
    fields = st.sampled_from(["n", "m", "scale_block", "format_version", "transposed", "checksum", "junk"])

    @hypothesis_seed(seed + 1)
    @quiet
    @given(key=st.sampled_from(packed), action=st.sampled_from(["field", "drop-field", "type", "names", "entry",
                                                                 "tensor-checksums", "tensor-names"]),
           field=fields, value=json_values, index=st.integers(0, 10**6))
    def metadata_edits(key, action, field, value, index):
        edited = dict(metadata)
        entry = json.loads(edited[key])
        if action == "field":
            entry["_data"][field] = value
        elif action == "drop-field":
            entry["_data"].pop(field, None)
        elif action == "type":
            entry["_type"] = value if isinstance(value, str) else "Tensor"
        elif action == "names":
            entry["_tensor_data_names"] = value
        elif action == "entry":
            del edited[key]
            entry = None
        elif action == "tensor-checksums":
            sums = json.loads(edited["pbs2p_tensor_checksums"])
            name = sorted(sums)[index % len(sums)]
            if value is None:
                sums.pop(name)  # one tensor's digest deleted
            else:
                sums[name] = hashlib.blake2b(repr(value).encode(), digest_size=16).hexdigest()  # or replaced
            edited["pbs2p_tensor_checksums"] = json.dumps(sums)
        else:
            names = json.loads(edited["tensor_names"])
            edited["tensor_names"] = json.dumps([n for n in names if n != key] + ([value] if value else []))
        if entry is not None:
            edited[key] = json.dumps(entry)
        if edited == metadata:
            return
        folder = copy()
        save_file(tensors, folder / "model.safetensors", metadata={k: str(v) for k, v in edited.items()})
        judge("metadata", folder, f"{action} {key} {field}={value!r}")

    start = time.perf_counter()
    byte_edits()
    metadata_edits()
    loader.close()
    by_kind: dict[str, dict] = defaultdict(dict)
    for (kind, outcome), count in sorted(outcomes.items()):
        by_kind[kind][outcome] = count
    total = sum(outcomes.values())
    return {"examples": total, "seconds": time.perf_counter() - start, "outcomes": dict(by_kind),
            "refusals": dict(errors.most_common()), "refusal_examples": samples, "bad": len(bad),
            "bad_cases": bad[:20]}


def _cause(message: str) -> str:
    """The kind of a refusal, from its message (to count them)."""
    message = message.split(REFUSAL, 1)[-1]
    for needle in ("does not match its checksum", "no valid pbs2p_tensor_checksums", "has no recorded checksum",
                   "is not in the checkpoint", "could not be rebuilt", "describes no packed weight",
                   "has no checksum in the checkpoint", "format version", "inconsistent BinarySparseTensor",
                   "quantization_config says", "no place for", "stored transposed", "cannot be read as safetensors",
                   "has a damaged metadata entry", "has no valid metadata entry", "has metadata of type",
                   "is listed in the metadata's tensor_names", "is not a JSON list", "not a tensor name"):
        if needle in message:
            return needle
    return message[:60]


# ------------------------------------------------------------------------------------------- kernel contract
def kernel_contract(examples: int, seed: int) -> dict:
    """The accuracy contract against fp64 on every path, over ``examples`` hypothesis examples."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    from pbs2p.kernels import native, ops, packing
    from pbs2p.kernels.reference import contract_ratio, reference_linear

    paths = ["torch"]
    if native.load():
        paths += native.supported_isas()
    worst: dict[str, float] = defaultdict(float)
    worst_case: dict[str, dict] = {}
    failures: list[dict] = []
    calls: Counter = Counter()
    done = Counter()
    nm_values = [(2, 4), (4, 8), (5, 8), (6, 8), (1, 4), (3, 4), (3, 8), (7, 8), (8, 16), (3, 16), (12, 16)]

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(nm=st.sampled_from(nm_values), out=st.integers(1, 200), groups=st.integers(1, 64),
           batch=st.sampled_from([1, 2, 3, 8, 17, 48, 70]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
           scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]), blocks_of=st.integers(0, 8),
           mu_kind=st.sampled_from(["small", "big", "near+", "near-", "zero", "alpha-tiny"]),
           x_kind=st.sampled_from(["normal", "wide", "sparse", "positive"]), with_bias=st.booleans(),
           seed=st.integers(0, 2**31 - 1))
    def example(nm, out, groups, batch, dtype, scale_dtype, blocks_of, mu_kind, x_kind, with_bias, seed):
        n, m = nm
        k = groups * m
        scale_block = k if blocks_of == 0 else blocks_of * m
        g = torch.Generator().manual_seed(seed)
        top = torch.rand(out, groups, m, generator=g).topk(n, -1).indices
        mask = torch.zeros(out, groups, m, dtype=torch.bool).scatter_(-1, top, True).reshape(out, k)
        codes = packing.pack(mask, torch.rand(out, k, generator=g) > 0.5, n, m)
        blocks = -(-k // scale_block)
        alpha = torch.rand(out, blocks, generator=g) + 0.05
        near = 1 - 1e-3 * torch.rand(out, blocks, generator=g)
        mu = {"small": 0.2 * torch.randn(out, blocks, generator=g), "big": 3 * torch.randn(out, blocks, generator=g),
              "near+": alpha * near, "near-": -alpha * near, "zero": torch.zeros(out, blocks),
              "alpha-tiny": torch.randn(out, blocks, generator=g)}[mu_kind]
        if mu_kind == "alpha-tiny":
            alpha = alpha * 1e-4
        alpha, mu = alpha.to(scale_dtype), mu.to(scale_dtype)
        x = torch.randn(batch, k, generator=g)
        if x_kind == "wide":
            x = x * torch.exp(4 * torch.randn(batch, k, generator=g))
        elif x_kind == "sparse":
            x = x * (torch.rand(batch, k, generator=g) < 0.05)
        elif x_kind == "positive":
            x = x.abs()
        x = x.to(dtype)
        bias = torch.randn(out, generator=g).to(dtype) if with_bias else None
        ys = {"torch": reference_linear(x, codes, alpha, mu, bias, n, m, scale_block)}
        for isa in paths[1:]:
            with native.use_isa(isa):
                ys[isa] = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
                if isa == "avx512" or dtype == torch.float32:
                    os.environ["PBS2P_BLAS_MIN_BATCH"] = "1"
                    try:
                        ys[f"{isa}-blas"] = torch.ops.pbs2p.bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block)
                    finally:
                        del os.environ["PBS2P_BLAS_MIN_BATCH"]
        failed = False
        for path, y in ys.items():
            ratio = contract_ratio(y, x, codes, alpha, mu, bias, n, m, scale_block, ops.TOLERANCE[dtype])
            calls[path] += 1
            case = {"path": path, "ratio": ratio, "nm": f"{n}:{m}", "out": out, "k": k, "batch": batch,
                    "dtype": str(dtype), "scale_dtype": str(scale_dtype), "scale_block": scale_block,
                    "mu": mu_kind, "x": x_kind, "bias": with_bias, "seed": seed}
            if ratio > worst[path]:
                worst[path], worst_case[path] = ratio, case
            if not ratio <= 1:
                failed = True
                failures.append(case)
        done["examples"] += 1
        done["failing_examples"] += failed

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        example()
    finally:
        torch.set_num_threads(threads)
    return {"examples": done["examples"], "failing_examples": done["failing_examples"], "calls": dict(calls),
            "failures": len(failures),
            "failure_cases": failures[:20], "worst_ratio": {p: round(r, 4) for p, r in sorted(worst.items())},
            "worst_cases": worst_case,
            "tolerance": {str(k): v for k, v in ops.TOLERANCE.items()}, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------- report
def command(arguments: dict) -> str:
    """The command line that wrote a record (every option spelled out, except the output folder)."""
    options = [f"--{k.replace('_', '-')} {v}" for k, v in arguments.items() if k not in ("out", "skip_fast")]
    flags = ["--skip-fast"] if arguments["skip_fast"] else []
    return " ".join(["python benchmarks/reliability.py", *options, *flags])


def markdown(record: dict) -> str:
    lines = ["# Reliability probes", "",
             f"Written by `{command(record['arguments'])}` on {record['created']} "
             f"({record['host']['cpu_count']} CPUs, torch {record['versions']['torch']}).", "",
             "A probe is *clean* when pbs2p gives the right result or refuses with an error that names the cause, "
             "leaving the user's model and files as they were; *bad* otherwise.", "",
             "| area | probes | clean | bad | pending | skipped |", "|---|---:|---:|---:|---:|---:|"]
    totals = Counter()
    for area, row in record["summary"].items():
        totals.update(row)
        lines.append(f"| {area} | {row['probes']} | {row['clean']} | {row['bad']} | {row.get('pending', 0)} | "
                     f"{row.get('skipped', 0)} |")
    lines.append(f"| **total** | **{totals['probes']}** | **{totals['clean']}** | **{totals['bad']}** | "
                 f"{totals['pending']} | {totals['skipped']} |")
    lines.append("")
    kill = record.get("kill_trials")
    if kill:
        lines += ["### kill -9 during `pbs2p compress --out X` over an existing X", "",
                  f"{kill['trials']} trials (a run takes {kill['run_seconds']:.1f} s, its save until the swap "
                  f"{kill['save_seconds']:.2f} s; even trials are killed anywhere in the run, odd ones inside the "
                  "save): "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(kill["outcomes"].items()))
                  + f". Mixed or missing folders: **{kill['bad']}**.", ""]
    builds = record.get("build_trials")
    if builds:
        lines += ["### Native build cache", "", "| probe | clean |", "|---|---|"]
        lines += [f"| {r['probe']} | {'yes' if r['clean'] else '**no**'} |" for r in builds["records"]]
        lines.append("")
    fuzz = record.get("fuzz")
    if fuzz:
        lines += ["### Checkpoint fuzz (hypothesis)", "", f"{fuzz['examples']} edited checkpoints, loaded by a "
                  "process that only did `import pbs2p` (restarted if a load kills it):", ""]
        for kind, outcomes in fuzz["outcomes"].items():
            lines.append(f"* {kind}: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
        lines.append("")
    kernel = record.get("kernel_contract")
    if kernel:
        lines += ["### Kernel accuracy contract against the exact float64 product", "",
                  f"{kernel['examples']} hypothesis examples, {sum(kernel['calls'].values())} calls "
                  f"({', '.join(f'{p}: {c}' for p, c in kernel['calls'].items())}); "
                  f"failures: **{kernel['failures']}**. "
                  "Worst error as a fraction of the bound: "
                  + ", ".join(f"{p} {r}" for p, r in kernel["worst_ratio"].items()) + ".", ""]
    return "\n".join(lines) + "\n"


def summarize(record: dict) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    for module, counts in record.get("fast", {}).get("areas", {}).items():
        row = {"probes": sum(counts.values()), "clean": counts.get("clean", 0), "bad": counts.get("bad", 0),
               "pending": counts.get("pending", 0), "skipped": counts.get("skipped", 0)}
        summary[f"CI: {AREAS.get(module, module)}"] = row
    if "kill_trials" in record:
        k = record["kill_trials"]
        summary["slow: kill -9 during compress --out"] = {"probes": k["trials"], "clean": k["trials"] - k["bad"],
                                                          "bad": k["bad"]}
    if "build_trials" in record:
        b = record["build_trials"]
        summary["slow: native build cache"] = {"probes": b["probes"], "clean": b["probes"] - b["bad"], "bad": b["bad"]}
    if "fuzz" in record:
        f = record["fuzz"]
        summary["slow: checkpoint bytes and metadata fuzz"] = {
            "probes": f["examples"], "clean": f["examples"] - f["bad"], "bad": f["bad"]}
    if "kernel_contract" in record:
        c = record["kernel_contract"]
        summary["slow: kernel contract vs fp64 (examples)"] = {
            "probes": c["examples"], "clean": c["examples"] - c["failing_examples"], "bad": c["failing_examples"]}
    return summary


def _shown(path: Path) -> str:
    """``path`` as the record shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-trials", type=int, default=20)
    parser.add_argument("--build-trials", type=int, default=3, help="interrupted builds (-1: no build probes)")
    parser.add_argument("--fuzz-examples", type=int, default=300)
    parser.add_argument("--kernel-examples", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fast", action="store_true", help="do not run tests/reliability")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from pbs2p_lab.eval.results import package_versions

    rng = random.Random(args.seed)
    record: dict = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "host": {"cpu_count": os.cpu_count()}, "versions": package_versions(),
                    "arguments": {**vars(args), "out": _shown(args.out)}}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pbs2p-reliability-") as tmp:
        work = Path(tmp)
        steps = [("fast", not args.skip_fast, lambda: fast_probes(work)),
                 ("kernel_contract", args.kernel_examples, lambda: kernel_contract(args.kernel_examples, args.seed)),
                 ("fuzz", args.fuzz_examples, lambda: fuzz_checkpoints(work, args.fuzz_examples, args.seed)),
                 ("kill_trials", args.kill_trials, lambda: kill_trials(work, args.kill_trials, rng)),
                 ("build_trials", args.build_trials >= 0, lambda: build_trials(work, args.build_trials, rng))]
        steps = [(name, step) for name, wanted, step in steps if wanted]
        for name, step in steps:
            start = time.perf_counter()
            print(f"[reliability] {name} ...", file=sys.stderr, flush=True)
            record[name] = step()
            print(f"[reliability] {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            record["summary"] = summarize(record)
            (args.out / "reliability.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    report = markdown(record)
    (args.out / "reliability.md").write_text(report)
    print(report)
    return 1 if any(row["bad"] for row in record["summary"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
