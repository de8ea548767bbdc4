"""Packed bits pinned for SmolLM2-shaped layers and a tiny LLaMA: a refactoring must not change them.

The restructure kept the previous digests bit for bit; these were re-pinned once, when SPBO with data
became progressive, and the two ``calibrate`` digests once more, when float32 activations of 32 rows and
more took the BLAS path of the AVX2 kernel (the pipeline's block forwards: the per-weight digests did not
change). Any change to the method's arithmetic shows up here. The compression runs in a
subprocess with torch's AVX2 kernels and MKL's AVX2 code path
forced (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``), one thread and the AVX2 packed kernel, so the float
arithmetic, and therefore the bits, are the same on AVX2 and AVX-512 machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PINS = {
    # name: (seed, out, in, calibrated, PBS2P options) -> sha256[:16] of qdata, scale, zero_point bytes
    "q_datafree_4of8": ((1, 576, 576, False, {"n": 4, "m": 8}), "54917fdec034d402"),
    "k_default_4of8": ((2, 192, 576, True, {"n": 4, "m": 8}), "de1534a9675b043b"),
    "down_default_6of8": ((3, 576, 1536, True, {"n": 6, "m": 8}), "0841c975a469a3c0"),
    "gate_oneshot_2of4_sb128": ((4, 1536, 576, True, {"n": 2, "m": 4, "spbo_steps": 0, "scale_block": 128}),
                                "c7e39fe23dcdda24"),
    "up_tau1_5of8_block": ((5, 1536, 576, True, {"n": 5, "m": 8, "spbo_steps": 1, "compensation": "block"}),
                           "e146fc82430d4221"),
    "o_blockdiag_4of8_sb64": ((6, 576, 576, True, {"n": 4, "m": 8, "compensation": "block-diag", "scale_block": 64}),
                              "5f18fa97f855ead3"),
}
CALIBRATE_PINS = {"4of8": "d98a367ff5127e02", "2of4": "8980e7d230e83a0b"}  # tiny LLaMA, calibrate defaults

SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from pbs2p import PBS2P, BinarySparseTensor, calibrate, compress_weight
    sys.path.insert(0, sys.argv[2])
    from helpers import tiny_llama

    def layer(seed, out, cols, samples=1024):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(out, cols, generator=g) * 0.02
        mix = torch.randn(cols, cols, generator=g) / cols**0.5
        X = torch.randn(samples, cols, generator=g) @ (torch.eye(cols) + 0.5 * mix)
        X[:, :3] *= 20.0  # a few massive channels
        X[:, 7] = 0.0  # one dead input
        return W, (2 * X.T.double() @ X.double() / samples).float()

    def digest(w, h=None):
        h = h or hashlib.sha256()
        for t in (w.qdata, w.scale, w.zero_point):
            h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h

    out = {}
    for name, ((seed, rows, cols, calibrated, options), _) in json.loads(sys.argv[1])["layers"].items():
        W, H = layer(seed, rows, cols)
        out[name] = digest(compress_weight(W, PBS2P(**options), H if calibrated else None)).hexdigest()[:16]
    for nm in json.loads(sys.argv[1])["calibrate"]:
        n, m = (int(v) for v in nm.split("of"))
        model = tiny_llama(0)
        calibrate(model, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)),
                  PBS2P(n=n, m=m), progress=False)
        h = hashlib.sha256()
        for key, p in sorted(model.named_parameters()):
            if isinstance(p, BinarySparseTensor):
                h.update(key.encode())
                h.update(digest(p).hexdigest()[:16].encode())
        out["calibrate_" + nm] = h.hexdigest()[:16]
    print(json.dumps(out))
''')


def test_packed_bits_are_pinned():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "PBS2P_KERNEL": "avx2",
           "OMP_NUM_THREADS": "1"}
    spec = json.dumps({"layers": PINS, "calibrate": list(CALIBRATE_PINS)})
    result = subprocess.run([sys.executable, "-c", SCRIPT, spec, str(Path(__file__).parents[2])], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {name: digest for name, (_, digest) in PINS.items()}
    expected |= {"calibrate_" + nm: digest for nm, digest in CALIBRATE_PINS.items()}
    assert got == expected
