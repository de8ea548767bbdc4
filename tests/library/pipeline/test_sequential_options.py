"""SequentialRunner: true-sequential stages, dense compressors, scale tuning."""

from __future__ import annotations

import torch
from helpers import packed_digest, tiny_llama

import pbs2p
from pbs2p import PBS2P
from pbs2p.pipeline import SequentialRunner


def calibration(n: int = 4, seq: int = 32, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def linears(block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)}


def test_stages_follow_the_llama_block():
    runner = SequentialRunner(tiny_llama(), calibration())
    assert runner.stages(0, linears(runner.blocks[0])) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_true_sequential_sees_the_compressed_earlier_stages():
    """o_proj's Hessian in true-sequential mode is the one of the block with compressed q/k/v."""
    seen: dict[tuple[bool, int, str], torch.Tensor] = {}

    def halve_qkv(i, name, linear, H):
        seen[(flag, i, name)] = H
        return linear.weight.detach() * (0.5 if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj") else 1.0)

    for flag in (False, True):
        runner = SequentialRunner(tiny_llama(), calibration())
        runner.compress([linears(b) for b in runner.blocks], halve_qkv, progress=False, true_sequential=flag)
    assert torch.equal(seen[(False, 0, "self_attn.q_proj")], seen[(True, 0, "self_attn.q_proj")])
    assert not torch.allclose(seen[(False, 0, "self_attn.o_proj")], seen[(True, 0, "self_attn.o_proj")])
    # by hand: block 0 with q/k/v halved, o_proj's input Hessian
    model = tiny_llama()
    runner = SequentialRunner(model, calibration())
    block = runner.blocks[0]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(block.self_attn, name).weight.mul_(0.5)
    expected = runner.hessians(0, {"self_attn.o_proj": block.self_attn.o_proj})["self_attn.o_proj"]
    torch.testing.assert_close(seen[(True, 0, "self_attn.o_proj")], expected)


def test_identity_compressor_is_exact_in_every_mode():
    """Returning the given weight changes nothing."""
    reference = tiny_llama()
    with torch.no_grad():
        expected = reference(calibration(1)).logits
    for true_sequential in (False, True):
        model = tiny_llama()
        runner = SequentialRunner(model, calibration())
        records = runner.compress([linears(b) for b in runner.blocks], lambda i, n, lin, H: lin.weight.detach(),
                                  progress=False, true_sequential=true_sequential)
        assert max(e for r in records for e in r.errors.values()) < 1e-3
        with torch.no_grad():
            torch.testing.assert_close(model(calibration(1)).logits, expected, atol=1e-4, rtol=1e-4)


def test_dense_compressor():
    model = tiny_llama()
    runner = SequentialRunner(model, calibration())

    def sign_only(i, n, lin, H):
        return lin.weight.detach().sign() * 0.02

    records = runner.compress([linears(b) for b in runner.blocks], sign_only, progress=False)
    assert all(torch.isfinite(torch.tensor(list(r.errors.values()))).all() for r in records)
    with torch.no_grad():
        assert torch.isfinite(model(calibration(1)).logits).all()


def test_block_tuning_lowers_the_block_error_and_keeps_the_storage():
    plain, tuned = tiny_llama(), tiny_llama()
    base = pbs2p.calibrate(plain, calibration(), PBS2P(n=4, m=8), cfs=None, tuning=None, progress=False)
    result = pbs2p.calibrate(tuned, calibration(), PBS2P(n=4, m=8), cfs=None, tuning=pbs2p.ScaleTuning(steps=5),
                             progress=False)
    for record in result.blocks:
        assert record.tune["last_pass"] < record.tune["first_pass"]
    assert result.report.bits_per_weight() == base.report.bits_per_weight()
    assert not any("forward" in mod.__dict__ for mod in tuned.modules())  # the tuning hooks are gone
    for (name, a), (_, b) in zip(base.report.converted, result.report.converted, strict=True):
        if name.startswith("model.layers.0."):  # block 0 sees the same inputs: only its scales moved
            assert torch.equal(a.qdata, b.qdata), name
            assert not torch.equal(a.scale, b.scale), name
    with torch.no_grad():
        ref = tiny_llama()(calibration(2)).logits
        err_plain = (plain(calibration(2)).logits - ref).norm()
        err_tuned = (tuned(calibration(2)).logits - ref).norm()
    assert err_tuned < err_plain


def test_tuning_judges_against_the_untuned_block_error_of_every_batch():
    """With 4 batches, ``before`` is block 0's error with its untuned packed weights over every batch, measured
    here by running that block on each batch."""
    calib = calibration(n=8)
    untuned = tiny_llama()
    pbs2p.calibrate(untuned, calib, PBS2P(n=4, m=8), cfs=None, tuning=None, batch_size=2, progress=False)
    result = pbs2p.calibrate(tiny_llama(), calib, PBS2P(n=4, m=8), cfs=None, tuning=pbs2p.ScaleTuning(steps=2),
                             batch_size=2, progress=False)
    original = tiny_llama()
    inputs = []
    hook = original.model.layers[0].register_forward_pre_hook(lambda _m, args, kwargs: inputs.append((args, kwargs)),
                                                              with_kwargs=True)
    with torch.no_grad():
        for chunk in calib.split(2):
            original(chunk, use_cache=False)
    hook.remove()
    squares = count = 0.0
    with torch.no_grad():
        for args, kwargs in inputs:
            want, got = (block(*args, **kwargs) for block in (original.model.layers[0], untuned.model.layers[0]))
            want, got = (y[0] if isinstance(y, tuple) else y for y in (want, got))
            squares += float(((got - want) ** 2).sum())
            count += want.numel()
    assert len(inputs) == 4
    record = result.blocks[0].tune
    assert abs(record["before"] - squares / count) <= 1e-5 * squares / count
    assert record["kept"] == (record["after"] < record["before"])


def test_freed_host_memory_goes_back_after_every_block_and_stage(monkeypatch):
    """The block loop hands freed heap memory back (glibc malloc_trim) when it closes a block and after each
    stage, so its resident set does not grow with depth; the trim changes no packed bit."""
    import platform

    from pbs2p.pipeline import host_memory, sequential

    assert host_memory.release_free_memory() is (platform.libc_ver()[0] == "glibc")  # trims wherever glibc is
    calls: list[int] = []
    monkeypatch.setattr(sequential, "release_free_memory", lambda: calls.append(1) or True)
    trimmed = tiny_llama()
    pbs2p.calibrate(trimmed, calibration(), PBS2P(n=4, m=8, spbo_steps=0), cfs=None, tuning=None,
                    true_sequential=True, progress=False)
    assert len(calls) == 2 * (4 + 1)  # 2 blocks x (4 LLaMA stages + close)
    monkeypatch.setattr(sequential, "release_free_memory", lambda: False)
    plain = tiny_llama()
    pbs2p.calibrate(plain, calibration(), PBS2P(n=4, m=8, spbo_steps=0), cfs=None, tuning=None,
                    true_sequential=True, progress=False)
    assert packed_digest(trimmed) == packed_digest(plain)
