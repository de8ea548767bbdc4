"""Greedy generation for decoding speed: a static KV cache and a compiled one-token step (gpt-fast style).

A Hugging Face causal LM's ``generate`` re-enters Python machinery (logits processors, stopping criteria,
cache bookkeeping) for every token, which costs more than the packed linears of a small model.
:class:`Generator` keeps one :class:`transformers.StaticCache` of fixed length (so the shapes never
change and the step compiles once), runs the prompt in one forward (prefill, only the last position's
logits), then one ``torch.compile``-d step per token: the model's forward on one token (the cache holds the
positions), and the argmax. Generation runs under ``torch.inference_mode()``: under ``no_grad`` every call of
the packed operator would still pass through its autograd formula (a Python function, microseconds per call).

The tokens are those of greedy decoding (``model.generate(..., do_sample=False)``) up to floating-point
summation order; eager and compiled steps give the same tokens on the packed model (tested).

Two rewrites make the compiled step faster without changing what it computes. The packed linears that read the
same activations (q, k, v; gate, up) run as one operator call each (:class:`pbs2p.FusePackedLinears`, equal
outputs bit for bit). And in a model whose key/value heads serve several query heads (grouped-query attention,
SmolLM2's 3 for 9), transformers' SDPA attention copies the whole cache of every layer to one copy per query
head under ``torch.compile``, every token; the step is traced with :func:`decode_sdpa`, which reads the shared
heads where they are (``enable_gqa``), and the model's ``config._attn_implementation`` is set back right after.

Guards. Before each call of compiled code, Dynamo checks its guards: for a model, one per module attribute,
parameter, buffer and tensor-subclass weight: thousands for a model (``TORCH_LOGS=guards`` lists them), some of
them Python calls, milliseconds per decoded token. The step is compiled without the guards on the model and on
the generator's own cache (``guard_filter_fn``; those on the step's input and on global state stay): it assumes
the model keeps the modules, parameters and buffers it had when it compiled (the cache is made by the generator,
and filled by the eager prefill before the first compiled step). The generator checks that assumption itself,
once per call rather than once per token: it records which modules (and their training flags) and tensors (and
their shapes and dtypes) the model holds, and compiles the step again when that record changes; other attributes
(a module's settings, the config) are not checked (make a new generator after changing them). Changing weight
values in place needs no recompilation (they are the compiled step's inputs). Each generator compiles its own
copy of the step's code, so generators of different models never share compiled code.

Direct calls. Even without those guards, each call of the compiled step runs Dynamo's code around the compiled
graph: the remaining guards, then a walk over the model's attributes that gathers the graph's inputs (every
weight, hundreds for a model) and the unpacking of the packed weights, about 0.8 ms per SmolLM2 token. The step is
compiled with :class:`DirectStep`, Inductor with a record of the graph's calls: when two consecutive steps
called the same graph with the same input objects except the token, and the graph's one output was the step's
result, the generator calls the graph itself from then on, with those inputs and the new token (the weights and
the cache are the same tensors from step to step, updated in place). That assumes what the guards above assume,
and that the step has no effect outside its tensors (none in transformers' decoder models with a static cache);
a change of the model's record compiles again and goes through Dynamo until two calls allow the direct ones.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .kernels.fusion import FusePackedLinears


def without_model_guards(entries: list) -> list[bool]:
    """Dynamo ``guard_filter_fn`` of the compiled step: drops the guards on the model and the generator's cache
    (``self.model...``, ``self.cache...``)."""
    roots = ("self.model", "self.cache")
    return [not any(e.name == r or e.name.startswith((f"{r}.", f"{r}[")) for r in roots) for e in entries]


def model_record(model: torch.nn.Module) -> tuple:
    """What the compiled step assumes of ``model``: its modules (by identity, type and training flag) and its
    parameters and buffers (by identity, type, shape and dtype), in order. Other attributes (a module's settings,
    the config) are not in it: make a new :class:`Generator` after changing them.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 2)
        >>> before = model_record(lin)
        >>> with torch.no_grad():
        ...     lin.weight.mul_(2)  # values: the same record
        >>> model_record(lin) == before
        True
        >>> lin.weight = torch.nn.Parameter(torch.ones(3, 4))  # another tensor: another record
        >>> model_record(lin) == before
        False
    """
    modules = model.named_modules(remove_duplicate=False)
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return (tuple((name, id(mod), type(mod), mod.training) for name, mod in modules),
            tuple((name, id(t), type(t), tuple(t.shape), t.dtype) for name, t in tensors))


#: Compile options of the decode step: no guards on the model (see the module's docstring), no size, stride
#: and alignment asserts on the compiled graph's tensors (about a thousand Python calls per token; the model's
#: tensors are the ones the step compiled with, see Guards), and the packed linears that read the same
#: activations fused into one operator call each (:class:`pbs2p.FusePackedLinears`).
STEP_OPTIONS = types.MappingProxyType({"guard_filter_fn": without_model_guards, "size_asserts": False,
                                       "alignment_asserts": False,
                                       "post_grad_custom_post_pass": FusePackedLinears()})

#: The attention of the compiled decode step (registered with transformers' attention and mask interfaces).
DECODE_ATTENTION = "pbs2p_decode_sdpa"


def decode_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that one query position (a decode step) of a model whose key/value
    heads serve several query heads reads them where they are (``enable_gqa``) instead of copying each
    ``num_key_value_groups`` times (under ``torch.compile`` transformers copies them: the whole cache, every
    layer, every token)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = not any(kwargs.get(k) for k in ("softcap", "position_bias", "output_attentions"))
    if query.shape[2] != 1 or groups <= 1 or not plain or kwargs.get("dropout", 0.0):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=kwargs.get("scaling"), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if DECODE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DECODE_ATTENTION, decode_sdpa)
        AttentionMaskInterface.register(DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def decode_attention(model: torch.nn.Module) -> Iterator[None]:
    """While the decode step compiles: a model on transformers' ``sdpa`` attention uses :func:`decode_sdpa`
    (``config._attn_implementation`` set back afterwards; the compiled step keeps what it traced). Configs with
    sub-configs (multimodal models, whose parts may use other attentions) are left as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sub_configs", None):
        yield
        return
    _register_decode_attention()
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


#: Added to :data:`STEP_OPTIONS` by ``Generator(..., cpp_wrapper=True)``: the step's host code in C++, built apart
#: from the kernels (a shorter build of the wrapper).
CPP_WRAPPER_OPTIONS = types.MappingProxyType({"cpp_wrapper": True, "cpp_wrapper_build_separate": True})


class DirectStep:
    """The Inductor backend of a :class:`Generator`'s step: compiles the graph Dynamo captured with Inductor
    (``options``: Inductor settings) and keeps, for the graph's calls made through Dynamo, the compiled graph, its
    inputs and its outputs, so that the generator can call the graph itself. Direct calls: Dynamo's code around
    the graph (its guards, the walk over the model that gathers the weights, about 0.8 ms per SmolLM2 token) runs
    until two consecutive steps called the same graph with the same input objects except the token and the
    graph's one output was the step's result; from then on the generator calls the graph with those inputs and
    the new token. That assumes what the step's dropped guards assume (the model keeps its modules and tensors;
    the generator compiles again when they change) and that the step has no effect outside its tensors."""

    def __init__(self, options: dict) -> None:
        self.options, self.graph, self.calls = options, None, []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=self.options)
        self.graph, self.calls = compiled, []

        def run(*args: object) -> object:
            outputs = compiled(*args)
            self.calls = [*self.calls[-1:], (list(args), outputs)]  # the last two calls
            return outputs

        return run

    def direct(self, previous: tuple, current: tuple) -> tuple | None:
        """``(graph, inputs, k)`` when the last two calls of the graph were the steps ``previous`` and ``current``
        (each ``(input, output)`` of the step): the same input objects but input ``k``, which was the step's input
        both times, and exactly one output, the step's; ``None`` otherwise."""
        if len(self.calls) < 2:
            return None
        (a, out_a), (b, out_b) = self.calls
        if len(a) != len(b) or len(out_a) != 1 or len(out_b) != 1:
            return None
        if out_a[0] is not previous[1] or out_b[0] is not current[1]:
            return None
        changed = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x is not y]
        if len(changed) != 1 or a[changed[0]] is not previous[0] or b[changed[0]] is not current[0]:
            return None
        return self.graph, b, changed[0]


@dataclass(frozen=True)
class Generation:
    """What a call of :class:`Generator` produced: the new ``tokens`` (ids); the seconds of the prefill (the prompt
    and the first new token); ``decode_steps`` timed decode steps and their ``decode_s`` seconds; ``compile_s``, the
    seconds of the step that compiled the decode step (the first compiled step of a generator; not timed as decoding).

    Example:
        >>> from pbs2p import Generation
        >>> Generation(tokens=[5, 9, 2], prefill_s=0.1, decode_s=0.04, decode_steps=2).tokens_per_s
        50.0
    """

    tokens: list[int]
    prefill_s: float
    decode_s: float
    decode_steps: int
    compile_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """The decode speed in timed decode steps per second (``nan`` when none was timed)."""
        return self.decode_steps / self.decode_s if self.decode_steps > 0 and self.decode_s > 0 else float("nan")


class Generator:
    """Greedy decoding of a causal LM with a static KV cache of ``max_len`` positions.

    Args:
        model: a Hugging Face causal LM (packed or not) accepting a ``cache``.
        max_len: positions in the cache: prompt plus new tokens of any call must fit.
        compile: compile the one-token step with ``torch.compile(fullgraph=True)``: compiled once, in the first
            decode step of the first call (reported as ``compile_s``, not counted in the decode speed); later calls
            of the same generator reuse it.
        cpp_wrapper: compile the step's host code to C++ as well (Inductor's ``cpp_wrapper``, built apart from the
            kernels): no Python runs between the operators of a decode step. The first compilation takes longer
            (a C++ build; cached across processes by Inductor). Needs ``compile=True``.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> from pbs2p import Generator
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> out = Generator(model, max_len=16, compile=False)(torch.tensor([[1, 2, 3]]), max_new_tokens=5)
        >>> len(out.tokens)
        5
    """

    def __init__(self, model: torch.nn.Module, max_len: int, *, compile: bool = True,
                 cpp_wrapper: bool = False) -> None:
        from transformers import StaticCache

        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2 (prompt plus new tokens), got {max_len!r}")
        if cpp_wrapper and not compile:
            raise ValueError("cpp_wrapper=True applies to the compiled step: it needs compile=True")
        self.model, self.max_len, self.compiled, self.cpp_wrapper = model, max_len, compile, cpp_wrapper
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)  # one cache: the step compiles once
        self._record = model_record(model)
        self.step = self._compiled_step() if compile else self._forward
        self._warm = False  # whether the compiled step has been compiled

    def _compiled_step(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # Dynamo keeps compiled code per code object: a copy of _forward's code of this generator's own (made
        # again for each compilation) keeps the compiled steps of different generators and models apart
        code = Generator._forward.__code__
        forward = types.FunctionType(code.replace(co_name=f"{code.co_name}_{id(self):x}"), globals())
        # a copy of the options: torch.compile takes guard_filter_fn out of the dict it is given
        options = dict(STEP_OPTIONS, **(CPP_WRAPPER_OPTIONS if self.cpp_wrapper else {}))
        self._backend = DirectStep({k: v for k, v in options.items() if k != "guard_filter_fn"})
        self._direct, self._last = None, None  # the direct call, once allowed; the last step through Dynamo
        return torch.compile(types.MethodType(forward, self), fullgraph=True, backend=self._backend,
                             options={"guard_filter_fn": options["guard_filter_fn"]})

    def _compiled_call(self, token: torch.Tensor) -> torch.Tensor:
        """One compiled step: the graph called directly once that is known to be safe, through Dynamo before."""
        if self._direct is not None:
            graph, inputs, k = self._direct
            inputs[k] = token
            return graph(*inputs)[0]
        out = self.step(token)
        previous, self._last = self._last, (token, out)
        if previous is not None:  # go direct after two steps that allow it
            self._direct = self._backend.direct(previous, self._last)
        return out

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        # the cache places the new keys after the ones it holds and the model takes the positions from it
        out = self.model(ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Greedy-decode up to ``max_new_tokens`` after ``input_ids`` (shape ``[1, prompt]``); stops after
        ``eos_token_id`` if given. ``on_token(id)`` is called with each new token as it is chosen (streaming)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape [1, prompt length] (batch 1), got {tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        if n < 1 or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"need a prompt of at least one token and max_new_tokens >= 1, got {n} tokens and "
                             f"{max_new_tokens!r}")
        if n + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({n}) plus max_new_tokens ({max_new_tokens}) exceed the cache's {self.max_len} "
                             "positions")
        record = model_record(self.model) if self.compiled else None
        if self.compiled and record != self._record:  # see the module's docstring (Guards)
            self._record, self.step, self._warm = record, self._compiled_step(), False
        self.cache.reset()
        start = time.perf_counter()
        token = self._forward(input_ids)
        tokens = [int(token)]
        prefill = time.perf_counter() - start
        if on_token is not None:
            on_token(tokens[-1])
        compile_s, steps, decode_s = 0.0, 0, 0.0
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and tokens[-1] == eos_token_id:
                break
            start = time.perf_counter()
            if not self.compiled:
                token = self.step(token)
            elif not self._warm:
                with decode_attention(self.model):  # traced into the step
                    token = self.step(token)
            else:
                token = self._compiled_call(token)
            tokens.append(int(token))
            if self.compiled and not self._warm:
                compile_s, self._warm = time.perf_counter() - start, True
            else:
                decode_s += time.perf_counter() - start
                steps += 1
            if on_token is not None:
                on_token(tokens[-1])
        return Generation(tokens, prefill, decode_s, steps, compile_s)


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, compile: bool = True,
             cpp_wrapper: bool = False, eos_token_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy-decode ``max_new_tokens`` after ``input_ids`` with a new :class:`Generator` (which compiles its step
    in this call; keep a :class:`Generator` to decode again without compiling). ``compile`` and ``cpp_wrapper``
    are the generator's.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from torchao.quantization import quantize_
        >>> from pbs2p import PBS2P, generate
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> quantize_(model.model.layers, PBS2P(n=4, m=8))
        >>> len(generate(model, torch.tensor([[1, 2, 3]]), 4, compile=False).tokens)
        4
    """
    gen = Generator(model, input_ids.shape[1] + max_new_tokens, compile=compile, cpp_wrapper=cpp_wrapper)
    return gen(input_ids, max_new_tokens, eos_token_id=eos_token_id, on_token=on_token)
