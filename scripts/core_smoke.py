"""The library without the lab: run in an environment made by ``pip install .`` (no extras).

Checks that ``import pbs2p`` loads none of the lab's dependencies (and that they are not even installed),
then runs quantize_, calibrate, save_pretrained/from_pretrained and the native kernel on a tiny random
LLaMA. Run by ``scripts/check_core_install.sh``; prints one line per check and exits non-zero on failure.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile

LAB = ("lm_eval", "matplotlib", "gguf", "mwparserfromhell")  # pyyaml comes with transformers


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import pbs2p
    from pbs2p.kernels.ops import kernel_backend

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in LAB)
    installed = sorted(name for name in LAB if importlib.util.find_spec(name) is not None)
    print(f"lab modules loaded by import pbs2p: {loaded}; lab packages installed: {installed}")
    assert not loaded and not installed
    assert "site-packages" in pbs2p.__file__, f"pbs2p imported from {pbs2p.__file__}, not the installed package"

    def tiny() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(cfg).eval()

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    report = pbs2p.quantize_(tiny(), pbs2p.PBS2P(n=4, m=8))
    print(f"quantize_: {len(report.converted)} linears, {report.bits_per_weight():.3f} bits/weight")
    result = pbs2p.calibrate(calibrated := tiny(), ids, pbs2p.PBS2P(n=4, m=8), progress=False)
    print(f"calibrate: {len(result.report.converted)} linears, kept fraction {result.report.kept_fraction()}")
    backend = kernel_backend()
    print(f"kernel backend: {backend}")
    assert backend.startswith("native-"), backend
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        expected = calibrated(ids).logits
        calibrated.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert isinstance(reloaded.model.layers[0].mlp.down_proj.weight, pbs2p.BinarySparseTensor)
        assert torch.equal(reloaded(ids).logits, expected)
    print("save_pretrained/from_pretrained: logits identical")
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        tiny().save_pretrained(f"{folder}/src")
        pbs2p.calibrate(pbs2p.Checkpoint(f"{folder}/src", f"{folder}/out"), ids, pbs2p.PBS2P(n=4, m=8), progress=False)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(f"{folder}/out")(ids).logits, expected)
    print("calibrate(Checkpoint): the folder written block by block reloads with the same logits")
    print("core install: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
