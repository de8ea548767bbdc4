"""torch.compile of converted models, and save/load of their state in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from helpers import tiny_llama
from torchao.quantization import quantize_

from pbs2p import PBS2P, BinarySparseTensor


def test_compile_fullgraph_matches_eager():
    model = tiny_llama()
    quantize_(model, PBS2P(n=4, m=8))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


def test_state_dict_round_trip_in_fresh_process(tmp_path):
    model = tiny_llama()
    quantize_(model, PBS2P(n=4, m=8))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"ids": ids, "logits": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import os, torch
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
        import pbs2p
        from torchao.quantization import quantize_
        sys_path = {str(tmp_path)!r}
        sd = torch.load(os.path.join(sys_path, "sd.pt"), weights_only=True)
        ref = torch.load(os.path.join(sys_path, "ref.pt"), weights_only=True)
        import sys; sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1])!r})
        from helpers import tiny_llama
        model = tiny_llama(seed=123)
        quantize_(model, pbs2p.PBS2P(n=4, m=8))
        model.load_state_dict(sd)
        for key, value in sd.items():
            got = model.state_dict()[key]
            assert type(got) is type(value), key
            if isinstance(value, pbs2p.BinarySparseTensor):
                for attr in ("qdata", "scale", "zero_point"):
                    assert torch.equal(getattr(got, attr), getattr(value, attr)), key
            else:
                assert torch.equal(got, value), key
        with torch.no_grad():
            assert torch.equal(model(ref["ids"]).logits, ref["logits"])
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert isinstance(loaded["model.layers.0.self_attn.q_proj.weight"], BinarySparseTensor)
