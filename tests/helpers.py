"""Tiny random models, synthetic layers and helpers shared by the tests (no downloads)."""

from __future__ import annotations

import torch

NM_PATTERNS = [(2, 4), (4, 8), (5, 8), (6, 8)]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random 2-layer LLaMA whose every linear is eligible for 8-groups (hidden 64, FFN 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def mlp(seed: int = 0) -> torch.nn.Module:
    """A random 4-layer MLP; the last linear (in 24) is not a multiple of 16."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 96),
        torch.nn.GELU(),
        torch.nn.Linear(96, 24),
        torch.nn.GELU(),
        torch.nn.Linear(24, 10),
    ).eval()


def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor in the state dict (to check that a refusal changed nothing)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_layer(seed: int, out: int = 32, cols: int = 64, dist: str = "gaussian", samples: int = 512,
               massive: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, H_cal, H_eval)``: one synthetic layer with Hessians from two disjoint halves of its inputs."""
    from pbs2p.algorithms import HessianAccumulator
    from pbs2p_lab.synthetic import synthetic_layer

    W, X = synthetic_layer(out, cols, samples=2 * samples, dist=dist, seed=seed, massive=massive)
    hessians = []
    for part in (X[0::2], X[1::2]):
        acc = HessianAccumulator(cols)
        acc.add(part)
        hessians.append(acc.hessian())
    return W, hessians[0], hessians[1]


def packed_digest(model: torch.nn.Module) -> str:
    """sha256 of every packed weight's name, codes and scales: equal digests mean equal packed bits."""
    import hashlib

    from pbs2p import BinarySparseTensor

    h = hashlib.sha256()
    for key, p in sorted(model.named_parameters()):
        if isinstance(p, BinarySparseTensor):
            h.update(key.encode())
            for t in (p.qdata, p.scale, p.zero_point):
                h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def random_packed_weight(
    out: int, k: int, n: int, m: int, scale_block: int, dtype: torch.dtype, seed: int, mu_kind: str = "small"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed codes of a random N:M mask and signs, with random alpha > 0 and mu (``mu_kind``: ``small``,
    ``big``, or ``near+``/``near-``: within 0.1% of +-alpha, where ``alpha * sign + mu`` cancels)."""
    from pbs2p.kernels import packing

    g = torch.Generator().manual_seed(seed)
    top = torch.rand(out, k // m, m, generator=g).topk(n, -1).indices
    mask = torch.zeros(out, k // m, m, dtype=torch.bool).scatter_(-1, top, True).reshape(out, k)
    signs = torch.rand(out, k, generator=g) > 0.5
    blocks = -(-k // scale_block)
    alpha = torch.rand(out, blocks, generator=g) + 0.05
    near = 1 - 1e-3 * torch.rand(out, blocks, generator=g)
    mu = {"small": 0.2 * torch.randn(out, blocks, generator=g), "big": 3 * torch.randn(out, blocks, generator=g),
          "near+": alpha * near, "near-": -alpha * near}[mu_kind]
    return packing.pack(mask, signs, n, m), alpha.to(dtype), mu.to(dtype)


def fp64_contract_ratio(
    y: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
    bias: torch.Tensor | None, n: int, m: int, scale_block: int, tolerance: float,
) -> float:
    """Largest ``|y - y_exact| / (tolerance * (|x| @ (kept * (|alpha| + |mu|)).T + |bias|))`` (``inf`` where ``y`` is
    NaN or Inf): the kernels' accuracy contract, checked against the tests' own float64 product of the stored
    values (from the unpacked mask and signs), not against any compute path of the library."""
    from pbs2p.kernels import packing

    mask, signs = packing.unpack(codes, n, m, alpha.shape[0])
    k = mask.shape[1]
    per_column = torch.arange(k) // scale_block if alpha.shape[1] > 1 else torch.zeros(k, dtype=torch.long)
    a, b = alpha.double()[:, per_column], mu.double()[:, per_column]
    kept = mask.double()
    weight = kept * (a * (2 * signs.double() - 1) + b)
    exact = x.double() @ weight.T
    scale = x.double().abs() @ (kept * (a.abs() + b.abs())).T
    if bias is not None:
        exact, scale = exact + bias.double(), scale + bias.double().abs()
    if exact.numel() == 0:
        return 0.0
    error = (y.double() - exact).abs().nan_to_num(nan=float("inf"))
    ratio = torch.where(error == 0, torch.zeros_like(error), error / (tolerance * scale))
    return float(ratio.max())
