"""End-to-end greedy decoding speed of SmolLM2: FP32 vs PBS²P (packed weights), eager and compiled.

    python benchmarks/decode_speed.py [--new-tokens 128] [--nm 4:8]

A static KV cache and one token per step, the decode step compiled with ``fullgraph=True``
(as gpt-fast does). Tokens/s counts the decode steps only (prefill and compilation excluded), measured
after a warm-up generation. Decoding speed does not depend on which weights are kept, so the packed
model is made with the data-free ``quantize_`` (same format and kernel as a calibrated one).
A third model, ``+ bf16 embeddings``, also stores the (tied) embedding / LM-head matrix in bfloat16
(cast to fp32 after the lookup, the head's product in bf16): the head is not part of PBS²P and,
untouched, is most of the packed model's bytes read per token. Its tokens are compared to the packed
model's. Writes ``benchmarks/results/decode/decode_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch
from transformers import StaticCache

import pbs2p
from pbs2p.kernels.ops import kernel_backend
from pbs2p.pipeline import decoder_blocks
from pbs2p_lab.assets import load_model
from pbs2p_lab.eval.results import package_versions

OUT = Path(__file__).parent / "results" / "decode"
PROMPT = "The history of the English language begins with the arrival of"


class Greedy:
    """Greedy generation with a static cache; ``compiled`` compiles the one-token decode step."""

    def __init__(self, model: torch.nn.Module, max_len: int, compiled: bool) -> None:
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)  # one cache: no recompiles
        self.step = torch.compile(self._step, fullgraph=True) if compiled else self._step

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logits = self.model(token, cache=self.cache, cache_position=position, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
        self.cache.reset()
        n = prompt.shape[1]
        logits = self.model(prompt, cache=self.cache, cache_position=torch.arange(n), use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = [int(token)]
        start = time.perf_counter()
        for i in range(new_tokens - 1):
            token = self.step(token, torch.tensor([n + i]))
            out.append(int(token))
        return out, (new_tokens - 1) / (time.perf_counter() - start)


class _BF16Embedding(torch.nn.Module):
    """Token embedding stored in bfloat16, returned in float32."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight).float()


class _BF16Head(torch.nn.Module):
    """LM head sharing the bfloat16 embedding matrix: bf16 product, float32 logits."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).float()


def bf16_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose tied embedding / LM-head matrix is stored once, in bfloat16."""
    model = copy.deepcopy(model)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise ValueError("expects tied input/output embeddings")
    weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().to(torch.bfloat16), requires_grad=False)
    model.model.embed_tokens = _BF16Embedding(weight)
    model.lm_head = _BF16Head(weight)
    return model


def measure(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, compiled: bool, repeats: int) -> dict:
    gen = Greedy(model, prompt.shape[1] + new_tokens, compiled)
    t0 = time.perf_counter()
    tokens, _ = gen(prompt, new_tokens)  # warm-up (and compilation)
    warmup = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        again, rate = gen(prompt, new_tokens)
        if again != tokens:
            raise RuntimeError("greedy decoding is not deterministic across runs")
        rates.append(rate)
    return {"tokens": tokens, "tokens_per_s": statistics.median(rates), "runs": rates, "warmup_s": warmup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--nm", default="4:8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, m = map(int, args.nm.split(":"))
    torch.manual_seed(0)
    fp32, tokenizer = load_model("smollm2")
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    packed = copy.deepcopy(fp32)
    blocks = {id(mod) for block in decoder_blocks(packed) for mod in block.modules()}
    report = pbs2p.quantize_(packed, pbs2p.PBS2P(n=n, m=m), filter_fn=lambda mod, _: id(mod) in blocks
                             and isinstance(mod, torch.nn.Linear))
    head16 = bf16_embeddings(packed)
    load = os.getloadavg()
    rows = {}
    models = (("fp32", fp32), (f"pbs2p {n}:{m}", packed), (f"pbs2p {n}:{m} + bf16 embeddings", head16))
    for label, model in models:
        for compiled in (False, True):
            key = f"{label} {'compiled' if compiled else 'eager'}"
            rows[key] = measure(model, prompt, args.new_tokens, compiled, args.repeats)
            print(f"{key:28s} {rows[key]['tokens_per_s']:8.2f} tokens/s", flush=True)
    packed_label = f"pbs2p {n}:{m}"
    same = rows[f"{packed_label} eager"]["tokens"] == rows[f"{packed_label} compiled"]["tokens"]
    head_label = f"{packed_label} + bf16 embeddings"
    head_same = rows[f"{head_label} compiled"]["tokens"] == rows[f"{packed_label} compiled"]["tokens"]
    result = {
        "command": "python benchmarks/decode_speed.py " + f"--new-tokens {args.new_tokens} --nm {args.nm}",
        "kernel_backend": kernel_backend(),
        "threads": torch.get_num_threads(),
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "decoder_bits_per_weight": report.bits_per_weight(),
        "prompt": PROMPT,
        "new_tokens": args.new_tokens,
        "packed_eager_equals_compiled": same,
        "bf16_embeddings_tokens_equal_packed": head_same,
        "rows": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()},
        "tokens": {k: v["tokens"] for k, v in rows.items()},
        "versions": package_versions(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decode_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    fp_c, fp_e = rows["fp32 compiled"]["tokens_per_s"], rows["fp32 eager"]["tokens_per_s"]
    lines = [
        f"SmolLM2-135M greedy decoding, {args.new_tokens} new tokens, batch 1, {torch.get_num_threads()} threads, "
        f"kernel backend `{kernel_backend()}`, load average {load[0]:.2f} before the run.",
        "",
        "| model | eager tokens/s | compiled tokens/s | compiled vs FP32 compiled |",
        "|---|---:|---:|---:|",
    ]
    for label, _ in models:
        e, c = rows[f"{label} eager"]["tokens_per_s"], rows[f"{label} compiled"]["tokens_per_s"]
        lines.append(f"| {label} | {e:.1f} | {c:.1f} | {c / fp_c:.2f}x |")
    lines += ["", f"Eager vs eager: {rows[f'{packed_label} eager']['tokens_per_s'] / fp_e:.2f}x. "
              f"Packed model's tokens identical eager vs compiled: {same}. "
              f"Decoder linears at {report.bits_per_weight():.3f} bits/weight. "
              f"With bf16 embeddings the generated tokens are {'identical to' if head_same else 'not identical to'} "
              "the packed model's."]
    (OUT / "decode_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
