"""Where a decoded token's time goes: the PyTorch profiler over compiled decode steps of packed SmolLM2.

    python benchmarks/decode_profile.py [--nm 4:8] [--steps 32] [--threads 2] [--embeddings int8|model] [--cpp-wrapper]

The packed model of ``benchmarks/decode_speed.py`` (data-free ``quantize_``; with ``--embeddings int8`` also
``int8_embeddings_``) decodes with a compiled :class:`pbs2p.Generator`; after two warm-up generations the
profiler records one generation (the prompt's prefill and ``--steps`` decode steps; the per-step figures divide
its totals by ``--steps``, so they include the prefill's share). Writes the operator table (self CPU time, sorted) and
the milliseconds per decode step of its top rows to ``benchmarks/results/decode/decode_profile.{md,json}``
(``decode_profile_cpp_wrapper.{md,json}`` with ``--cpp-wrapper``: the step compiled with
``Generator(..., cpp_wrapper=True)``).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402
from decode_speed import OUT, PROMPT, packed_copy  # noqa: E402 (the decode benchmark's model and prompt)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import pbs2p  # noqa: E402
from pbs2p.kernels.ops import kernel_backend  # noqa: E402
from pbs2p_lab.assets import load_model  # noqa: E402
from pbs2p_lab.eval.results import package_versions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nm", default="4:8")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embeddings", choices=("int8", "model"), default="int8")
    parser.add_argument("--cpp-wrapper", action="store_true", help="the step with Inductor's C++ wrapper")
    args = parser.parse_args()
    n, m = map(int, args.nm.split(":"))
    torch.set_num_threads(args.threads)
    fp32, tokenizer = load_model("smollm2")
    model, _ = packed_copy(fp32.eval(), n, m)
    del fp32
    if args.embeddings == "int8":
        pbs2p.int8_embeddings_(model)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    gen = pbs2p.Generator(model, prompt.shape[1] + args.steps + 1, compile=True, cpp_wrapper=args.cpp_wrapper)
    for _ in range(2):
        gen(prompt, args.steps + 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = gen(prompt, args.steps + 1)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"name": e.key, "calls_per_step": e.count / args.steps,
            "ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
            "share": e.self_cpu_time_total / total} for e in events[:12]]
    record = {"command": f"python benchmarks/decode_profile.py --nm {args.nm} --steps {args.steps} "
                         f"--threads {args.threads} --embeddings {args.embeddings}"
                         + (" --cpp-wrapper" if args.cpp_wrapper else ""),
              "cpp_wrapper": args.cpp_wrapper,
              "kernel_backend": kernel_backend(), "threads": args.threads, "load_average": os.getloadavg(),
              "tokens_per_s_while_profiled": out.tokens_per_s, "ms_per_step_profiled": total / 1e3 / args.steps,
              "top": top, "versions": package_versions()}
    OUT.mkdir(parents=True, exist_ok=True)
    stem = "decode_profile_cpp_wrapper" if args.cpp_wrapper else "decode_profile"
    (OUT / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    wrapper = "C++ wrapper" if args.cpp_wrapper else "Python wrapper"
    lines = [f"Compiled decode steps ({wrapper}) of SmolLM2 {args.nm} (embeddings: {args.embeddings}), "
             f"{args.threads} threads, `{kernel_backend()}`; profiled one generation, the prefill of the "
             f"{prompt.shape[1]}-token prompt and "
             f"{args.steps} decode steps ({out.tokens_per_s:.1f} tokens/s while profiled); per step = its totals / "
             f"{args.steps} ({total / 1e3 / args.steps:.2f} ms of self CPU time), so the prefill's share is in them.",
             "",
             "| operator (self CPU time) | calls per step | ms per step | share |", "|---|---:|---:|---:|"]
    lines += [f"| {t['name'][:60]} | {t['calls_per_step']:.0f} | {t['ms_per_step']:.2f} | {t['share']:.1%} |"
              for t in top]
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
