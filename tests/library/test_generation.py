"""``pbs2p.generate`` / ``Generator`` (static cache, compiled step) and ``pbs2p.int8_embeddings_``."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pbs2p import PBS2P, Generator, generate, int8_embeddings_, quantize_
from pbs2p.embeddings import Int8Embedding, Int8Head
from pbs2p.generation import without_model_guards

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def packed_llama() -> LlamaForCausalLM:
    model = tiny_llama()
    quantize_(model.model.layers, PBS2P(n=4, m=8))
    return model


def hf_greedy(model, ids: torch.Tensor, new: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_tokens_are_transformers_greedy_tokens():
    model = packed_llama()
    ids = torch.tensor([[5, 17, 3, 40]])
    out = generate(model, ids, 10, compile=False)
    assert out.tokens == hf_greedy(model, ids, 10)
    assert out.decode_steps == 9 and out.compile_s == 0 and out.tokens_per_s > 0


@pytest.mark.parametrize("compiled", [False, True])
def test_each_step_writes_its_own_cache_position(compiled):
    """The keys the generator cached equal those of one forward over prompt + generated tokens, position by position
    (a cache not reset between calls, or a step at the wrong place, shows here; greedy tokens of a random model may
    not show it)."""
    model = packed_llama()
    ids = torch.tensor([[5, 17, 3, 40]])
    gen = Generator(model, 16, compile=compiled)
    gen(torch.tensor([[9, 1, 7]]), 5)  # an earlier call: its keys must not stay
    out = gen(ids, 8)
    full = torch.cat([ids, torch.tensor([out.tokens[:-1]])], dim=1)  # the last token is chosen, not yet cached
    with torch.no_grad():
        reference = model(full, use_cache=True).cache
    n = full.shape[1]
    for mine, theirs in zip(gen.cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(mine.keys[:, :, :n], theirs.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.values[:, :, :n], theirs.values, rtol=1e-5, atol=1e-6)
        assert not mine.keys[:, :, n:].any()  # nothing written past the last step


def test_compiled_step_gives_the_eager_tokens_and_compiles_once():
    model = packed_llama()
    ids = torch.tensor([[5, 17, 3, 40]])
    eager = generate(model, ids, 8, compile=False)
    gen = Generator(model, 16, compile=True)
    first = gen(ids, 8)
    again = gen(torch.tensor([[9, 1]]), 6)
    assert first.tokens == eager.tokens
    assert first.compile_s > 0 and first.decode_steps == 6  # the compiling step is not timed as decoding
    assert again.compile_s == 0 and again.decode_steps == 5
    assert again.tokens == generate(model, torch.tensor([[9, 1]]), 6, compile=False).tokens


def test_generators_of_different_models_do_not_share_compiled_steps():
    """The step compiles without guards on the model: a second generator of the same class, config and cache
    shape must still run its own model (Dynamo would otherwise reuse the first generator's compiled code)."""
    ids = torch.tensor([[5, 17, 3, 40]])
    a, b = tiny_llama(tied=False, seed=0), tiny_llama(tied=False, seed=1)  # untied: tokens that depend on the model
    for model in (a, b):
        quantize_(model.model.layers, PBS2P(n=4, m=8))
    first = Generator(a, 16, compile=True)(ids, 8).tokens
    second = Generator(b, 16, compile=True)(ids, 8).tokens
    assert first == generate(a, ids, 8, compile=False).tokens
    assert second == generate(b, ids, 8, compile=False).tokens
    assert first != second  # the two models disagree, so sharing would show


def test_compiled_step_fuses_the_packed_linears_of_one_input():
    """q, k, v and gate, up read one normalized state each: two ``bsp_linear_multi`` calls and two single calls
    (o_proj, down_proj) per layer."""
    model = packed_llama()
    gen = Generator(model, 16, compile=True)
    ids = torch.tensor([[5, 17, 3, 40]])
    gen(ids, 3)
    with torch.profiler.profile() as prof:
        gen(ids, 2)  # the prefill (eager) and one compiled step
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = len(model.model.layers)
    assert calls["pbs2p::bsp_linear_multi"] == 2 * layers
    assert calls["pbs2p::bsp_linear"] == 7 * layers + 2 * layers  # the prefill's 7 per layer, the step's 2


def test_steps_call_the_graph_directly_after_two_checked_calls():
    model = packed_llama()
    ids = torch.tensor([[5, 17, 3, 40]])
    gen = Generator(model, 24, compile=True)
    assert gen(ids, 3).tokens == generate(model, ids, 3, compile=False).tokens
    assert gen._direct is None  # one step after the compiling one: not yet checked
    first = gen(ids, 8)
    assert gen._direct is not None and first.tokens == generate(model, ids, 8, compile=False).tokens
    dynamo_calls = []
    step = gen.step
    gen.step = lambda token: dynamo_calls.append(token) or step(token)
    other = torch.tensor([[9, 1, 33]])
    assert gen(other, 10).tokens == generate(model, other, 10, compile=False).tokens
    assert dynamo_calls == []  # every step called the graph itself
    before = gen(other, 10).tokens
    with torch.no_grad():  # values changed in place (a norm, a packed weight's scales): read by the direct calls
        model.model.norm.weight.mul_(-1)  # the logits change sign
        model.model.layers[0].self_attn.q_proj.weight.scale.mul_(4)
    assert gen(other, 10).tokens != before
    assert gen(other, 10).tokens == generate(model, other, 10, compile=False).tokens
    model.model.layers[1].mlp = copy.deepcopy(model.model.layers[1].mlp)  # new modules: compiled again
    again = gen(other, 10)
    assert again.compile_s > 0 and again.tokens == generate(model, other, 10, compile=False).tokens


def test_direct_calls_need_two_calls_that_differ_only_in_the_step_input():
    from pbs2p.generation import DirectStep

    w, cache = torch.ones(2), torch.zeros(2)
    t1, t2, o1, o2 = (torch.tensor([i]) for i in range(4))
    backend = DirectStep({})
    backend.graph = graph = object()
    backend.calls = [([w, t1, cache], [o1])]
    assert backend.direct((t1, o1), (t2, o2)) is None  # one call recorded
    backend.calls = [([w, t1, cache], [o1]), ([w, t2, cache], [o2])]
    assert backend.direct((t1, o1), (t2, o2)) == (graph, [w, t2, cache], 1)
    assert backend.direct((t1, o1), (t2, torch.tensor([3]))) is None  # the step returned something else
    assert backend.direct((t1, o1), (torch.tensor([1]), o2)) is None  # the changed input was not the step's
    backend.calls = [([w, t1, cache], [o1]), ([w, t2, torch.zeros(2)], [o2])]
    assert backend.direct((t1, o1), (t2, o2)) is None  # another input changed too
    backend.calls = [([w, t1, cache], [o1, w]), ([w, t2, cache], [o2, w])]
    assert backend.direct((t1, o1), (t2, o2)) is None  # the graph has a second output


def test_decode_attention_reads_shared_heads_in_place_and_equals_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pbs2p.generation import decode_sdpa

    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 1, 9, generator=g) > 0.3
    mask[..., 0] = True
    for query in (q, torch.randn(2, 6, 4, 16, generator=g)):  # one position (enable_gqa), four (transformers' path)
        m = mask.expand(2, 1, query.shape[2], 9)
        got, _ = decode_sdpa(module, query, k, v, m, dropout=0.0, scaling=0.3)
        expected, _ = sdpa_attention_forward(module, query, k, v, m, dropout=0.0, scaling=0.3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_attention_setting_is_restored_after_compiling_even_on_failure(monkeypatch):
    model = packed_llama()
    gen = Generator(model, 16, compile=True)
    seen = []

    def failing_step(ids):
        seen.append(model.config._attn_implementation)
        raise RuntimeError("compilation failed")

    gen.step = failing_step
    with pytest.raises(RuntimeError, match="compilation failed"):
        gen(torch.tensor([[5, 17, 3]]), 4)
    assert seen == ["pbs2p_decode_sdpa"] and model.config._attn_implementation == "sdpa"
    Generator(model, 16, compile=True)(torch.tensor([[5, 17, 3]]), 4)
    assert model.config._attn_implementation == "sdpa"


@pytest.fixture
def compile_options(monkeypatch) -> list[dict]:
    """The options of every ``torch.compile`` call made during the test (copied before torch.compile edits them)."""
    options, compile_ = [], torch.compile

    def spy(fn, **kwargs):
        options.append(dict(kwargs.get("options") or {}))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    return options


def test_every_compilation_drops_the_model_guards(compile_options):
    """torch.compile takes ``guard_filter_fn`` out of the options dict it is given: every compilation (a second
    generator, a recompilation) needs the filter again, or its step checks thousands of guards per token."""
    ids = torch.tensor([[5, 17, 3, 40]])
    model = packed_llama()
    Generator(model, 16)(ids, 4)
    gen = Generator(model, 16)
    gen(ids, 4)
    int8_embeddings_(model)
    assert gen(ids, 4).compile_s > 0  # compiled again
    assert len(compile_options) == 3
    assert all(o.get("guard_filter_fn") is without_model_guards for o in compile_options), compile_options


@pytest.mark.parametrize("compiled", [False, True])
def test_decoding_runs_in_inference_mode(compiled):
    """Under no_grad every packed call would still go through the operator's Python autograd formula."""
    modes = []
    model = packed_llama()
    Generator(model, 16, compile=compiled)(torch.tensor([[5, 17, 3]]), 4,
                                           on_token=lambda _: modes.append(torch.is_inference_mode_enabled()))
    assert modes == [True] * 4
    assert not torch.is_inference_mode_enabled()


def test_changed_modules_recompile_and_changed_values_do_not():
    ids = torch.tensor([[5, 17, 3, 40]])
    model = packed_llama()
    gen = Generator(model, 16, compile=True)
    gen(ids, 6)
    with torch.no_grad():  # values in place: the compiled step reads them, no recompilation
        model.model.norm.weight.mul_(-1.5)
    same_modules = gen(ids, 6)
    assert same_modules.compile_s == 0 and same_modules.tokens == generate(model, ids, 6, compile=False).tokens
    int8_embeddings_(model)  # new modules: the next call compiles the step again
    new_modules = gen(ids, 6)
    assert new_modules.compile_s > 0 and new_modules.tokens == generate(model, ids, 6, compile=False).tokens
    again = gen(ids, 6)
    assert again.compile_s == 0 and again.tokens == new_modules.tokens
    model.train()  # a module's training flag is in the record too (dropout is traced only in training mode)
    assert gen(ids, 6).compile_s > 0
    model.eval()


def test_cpp_wrapper_step_gives_the_eager_tokens(compile_options):
    ids = torch.tensor([[5, 17, 3, 40]])
    model = packed_llama()
    int8_embeddings_(model)
    gen = Generator(model, 16, cpp_wrapper=True)
    out = gen(ids, 6)
    assert out.tokens == generate(model, ids, 6, compile=False).tokens and out.compile_s > 0
    assert gen._backend.options["cpp_wrapper"] is True  # Inductor's settings, given to the step's backend
    assert compile_options[-1]["guard_filter_fn"] is without_model_guards
    with pytest.raises(ValueError, match="needs compile=True"):
        Generator(model, 16, compile=False, cpp_wrapper=True)


def test_stops_after_eos_and_streams_each_token():
    model = packed_llama()
    ids = torch.tensor([[5, 17, 3, 40]])
    full = generate(model, ids, 8, compile=False).tokens
    seen: list[int] = []
    stopped = generate(model, ids, 8, compile=False, eos_token_id=full[2], on_token=seen.append).tokens
    assert stopped == full[: full.index(full[2]) + 1] == seen


@pytest.mark.parametrize("bad", [{"ids": torch.tensor([[1, 2]]), "new": 0}, {"ids": torch.tensor([1, 2]), "new": 2},
                                 {"ids": torch.tensor([[1, 2], [3, 4]]), "new": 2},
                                 {"ids": torch.tensor([[1] * 10]), "new": 7}])
def test_bad_requests_are_refused(bad):
    gen = Generator(tiny_llama(), 16, compile=False)
    with pytest.raises(ValueError):
        gen(bad["ids"], bad["new"])


def test_int8_embeddings_keep_ties_and_stay_close():
    model = packed_llama()
    ids = torch.tensor([[5, 17, 3, 40, 2, 11]])
    before = model(ids).logits
    weight = model.model.embed_tokens.weight.detach().clone()
    report = int8_embeddings_(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Head)
    assert report.tied and head.rows is emb.rows  # one int8 copy serves both
    assert report.bytes_after == 96 * 64 + 96 * 4 and report.bytes_before == 96 * 64 * 4
    after = model(ids).logits
    err = (after - before).abs().max() / before.abs().max()
    assert 0 < err < 0.02
    rows = emb.rows.rows(torch.arange(96))  # within half a step of the weight each replaced
    assert ((rows - weight).abs() <= emb.rows.scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(emb(ids[0]), rows[ids[0]])
    assert len(generate(model, ids, 3, compile=False).tokens) == 3


def test_untied_models_get_two_matrices():
    model = tiny_llama(tied=False)
    original = model.lm_head.weight.detach().clone()
    report = int8_embeddings_(model)
    assert not report.tied and model.lm_head.rows is not model.model.embed_tokens.rows
    q, s = model.lm_head.rows.q.float(), model.lm_head.rows.scale
    assert ((q * s[:, None] - original).abs() <= s[:, None] / 2 + 1e-7).all()
    assert q.abs().amax(1).eq(127).all()  # symmetric: the largest weight of each row maps to +-127


def test_refusals_leave_the_model_unchanged():
    model = tiny_llama()
    model.model.embed_tokens.weight.data[3, 5] = float("nan")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="finite"):
        int8_embeddings_(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(TypeError, match="get_input_embeddings"):
        int8_embeddings_(torch.nn.Linear(4, 4))
