"""Save real (W, H_cal, H_eval) of some SmolLM2 linears for ``bench_layer_errors.py``. Not a test.

    .venv/bin/python tests/algorithms/extract_real_hessians.py --out /tmp/smollm2_layers.pt

Uses the project's built-in model and calibration text (the calibration part of the Wikipedia split).
Inputs are those of the *uncompressed* model (layer-level measurement, not the sequential pipeline);
``Hcal`` and ``Heval`` come from disjoint segments.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="0,2,5,10,15,20,25,27,28,29")
    ap.add_argument("--modules", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    ap.add_argument("--nsamples", type=int, default=16, help="segments; half for Hcal, half for Heval")
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pbs2p.algorithms.hessian import HessianAccumulator
    from pbs2p.assets import model_dir
    from pbs2p.data.calibration import calibration_tokens

    folder = model_dir("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tokens = calibration_tokens(AutoTokenizer.from_pretrained(folder), args.nsamples, args.seqlen, seed=0)
    layers = [int(x) for x in args.layers.split(",")]
    names = args.modules.split(",")
    acc: dict[str, list[HessianAccumulator]] = {}
    part = {"i": 0}
    handles = []
    for li in layers:
        for nm in names:
            mod = model.model.layers[li].get_submodule(nm)
            key = f"{li}.{nm}"
            acc[key] = [HessianAccumulator(mod.in_features), HessianAccumulator(mod.in_features)]
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, key=key: acc[key][part["i"]].add(a[0].detach())))
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            part["i"] = int(i >= tokens.shape[0] // 2)
            model(tokens[i:i + 1])
    for h in handles:
        h.remove()
    out = {}
    for key, (cal, ev) in acc.items():
        li, nm = key.split(".", 1)
        W = model.model.layers[int(li)].get_submodule(nm).weight.detach().float().clone()
        out[key] = {"W": W, "Hcal": cal.hessian(), "Heval": ev.hessian()}
    torch.save(out, args.out)
    print(f"saved {len(out)} layers to {args.out}")


if __name__ == "__main__":
    main()
