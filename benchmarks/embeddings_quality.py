"""What ``pbs2p.int8_embeddings_`` costs in quality: a compressed folder with and without int8 embeddings.

    pbs2p compress --model smollm2 --nm 4:8 --out runs/smollm2_4of8
    python benchmarks/embeddings_quality.py --model runs/smollm2_4of8 [--ppl-limit 40] [--new-tokens 128]

Held-out perplexity (the packaged Wikipedia split, ``--ppl-limit`` windows of 2048 tokens) of the folder as
saved and after ``int8_embeddings_`` (input embedding and LM head as int8 rows), their relative change, the
model sizes, and the greedy-token agreement of the two over ``--new-tokens`` tokens after the decode
benchmark's prompt (eager :class:`pbs2p.Generator`). Writes ``benchmarks/results/embeddings/<folder name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402
from decode_speed import PROMPT, agreement  # noqa: E402 (the decode benchmark's prompt)

import pbs2p  # noqa: E402
from pbs2p_lab.assets import load_model  # noqa: E402
from pbs2p_lab.data.calibration import tokenize_text  # noqa: E402
from pbs2p_lab.data.split import load_split  # noqa: E402
from pbs2p_lab.eval.perplexity import perplexity  # noqa: E402
from pbs2p_lab.eval.results import model_size_bytes, result_header  # noqa: E402

OUT = Path(__file__).parent / "results" / "embeddings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a `pbs2p compress` folder (or any causal LM pbs2p loads)")
    parser.add_argument("--ppl-limit", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    model.eval()
    ids = tokenize_text(tokenizer, load_split().heldout_text)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    rows = {}
    for variant in ("as saved", "int8 embeddings"):
        report = pbs2p.int8_embeddings_(model) if variant == "int8 embeddings" else None
        ppl = perplexity(model, ids, seqlen=2048, limit=args.ppl_limit, progress=False)
        tokens = pbs2p.generate(model, prompt, args.new_tokens, compile=False).tokens
        rows[variant] = {"ppl": ppl.ppl, "windows": ppl.windows, "size_mb": model_size_bytes(model) / 1e6,
                         "tokens": tokens}
        if report is not None:
            rows[variant]["embeddings"] = {"tied": report.tied, "bytes_before": report.bytes_before,
                                           "bytes_after": report.bytes_after}
        print(f"{variant:16s} ppl {ppl.ppl:.2f}  size {rows[variant]['size_mb']:.2f} MB", flush=True)
    a, b = rows["as saved"], rows["int8 embeddings"]
    agree = agreement(b["tokens"], a["tokens"])
    prefix, equal = agree["common_prefix"], agree["equal_positions"]
    change = b["ppl"] / a["ppl"] - 1
    record = {**result_header("python benchmarks/embeddings_quality.py " + f"--model {Path(args.model).name} "
                              f"--ppl-limit {args.ppl_limit} --new-tokens {args.new_tokens}"),
              "model": Path(args.model).name, "threads": torch.get_num_threads(), "rows": rows,
              "ppl_relative_change": change, "greedy_common_prefix": prefix, "greedy_equal_positions": equal}
    OUT.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"`{name}` (a `pbs2p compress` folder of SmolLM2-135M), held-out perplexity over {a['windows']} windows "
             "of 2048 tokens, with and without `pbs2p.int8_embeddings_`.", "",
             "| embeddings | perplexity | model size MB |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['ppl']:.2f} | {v['size_mb']:.2f} |" for k, v in rows.items()]
    lines += ["", f"Perplexity change with int8 embeddings: {change:+.2%}. Greedy tokens ({args.new_tokens} after the "
              f"decode benchmark's prompt): equal for the first {prefix}, {equal:.0%} of positions equal."]
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
