"""Block-by-block compression of a causal LM on calibration tokens, for any per-linear compressor.

The model's forward is run once per batch with every decoder block replaced by a recorder, which keeps
the hidden states entering block 0 and the other arguments each block receives (masks, rotary
embeddings: Gemma-3 gives different ones to different blocks). Then each block in turn: its linears'
input Hessians are collected on the inputs it receives from the already-compressed blocks before it,
its linears are compressed, and it is run again to produce the next block's inputs. Only one block's
activations are held at a time.

Two options change what each linear is fitted to (both measured in ``benchmarks/quality.py``):

* ``true_sequential``: inside a block, the linears are compressed in *stages* — the groups of linears
  that read the same tensor, in call order (LLaMA: q/k/v, then o, then gate/up, then down) — and each
  stage's Hessians are collected with the earlier stages already compressed (GPTQ's "true sequential").
  A stage's statistics pass stops at its last linear, so the extra cost is a prefix of the block.
* ``fp_target``: each linear is fitted to the output the *uncompressed* model produces from its own
  (uncompressed) inputs, ``min ‖X Wᵀ − X̂ Ŵᵀ‖`` with ``X`` the full-precision and ``X̂`` the actual
  (compressed-upstream) inputs, instead of ``min ‖X̂ (W − Ŵ)ᵀ‖``. With ``H = X̂ᵀX̂`` and
  ``A = XᵀX̂`` this is the usual problem for the target ``W_t = W A H⁻¹`` (so any compressor works
  unchanged): every layer can undo part of the drift of the layers before it. It costs a second,
  full-precision stream of hidden states and its forwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..algorithms import HessianAccumulator, relative_output_error
from ..algorithms.hessian import damp_hessian
from ..quantize import check_finite
from ..tensor import BinarySparseTensor
from .block_tune import block_mse, tune_block_scales
from .families import decoder_blocks, is_conv1d, linears_as_nn_linear

# (block index, linear name inside the block, the linear, its input Hessian) -> the new weight
LinearCompressor = Callable[[int, str, torch.nn.Linear, torch.Tensor], torch.Tensor]


@dataclass
class BlockRecord:
    """What happened to one decoder block."""

    index: int
    n: int | None  # N kept per group (PBS²P), if the compressor has one
    cosine: float | None  # cosine similarity of the block's input and output (CFS), if measured
    errors: dict[str, float]  # linear name -> ||(W - W_hat) X|| / ||W X|| on the calibration inputs
    seconds: float
    tune: dict[str, float] | None = None  # block output MSE before/after scale tuning, if tuned


class _Stop(Exception):
    """Raised inside the last block to end the capture forward early (skips the norm and LM head)."""


@dataclass
class _BlockCall:
    """The positional and keyword arguments the model passes to a block besides the hidden states."""

    args: tuple
    kwargs: dict


def check_calibration(calibration: object) -> None:
    """Refuse anything but a non-empty integer ``[nsamples, seqlen]`` tensor of token ids."""
    if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and calibration.numel() > 0):
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a non-empty LongTensor [nsamples, seqlen], got {shape}")
    if calibration.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calibration must hold token ids (int64), got {calibration.dtype}")


class SequentialRunner:
    """Holds the calibration activations of one block at a time and walks the decoder blocks.

    Construction refuses bad calibration data and NaN/Inf weights before changing anything, then
    turns GPT-2's ``Conv1D`` into equivalent ``nn.Linear`` and captures the blocks' inputs.
    With ``fp_target`` or ``fp_stream`` it also keeps the hidden states of the uncompressed model (see
    the module docstring); ``target_damp`` is the damping of ``H`` in ``W_t = W A H⁻¹``.
    """

    def __init__(
        self, model: torch.nn.Module, calibration: torch.Tensor, batch_size: int = 4, *, fp_target: bool = False,
        fp_stream: bool = False, target_damp: float = 0.01,
    ) -> None:
        check_calibration(calibration)
        self.blocks = decoder_blocks(model)
        for i, block in enumerate(self.blocks):
            for name, mod in block.named_modules():
                weight = getattr(mod, "weight", None)
                if (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)) and weight.dtype.is_floating_point:
                    check_finite(f"block {i}: {name}", weight)
        for block in self.blocks:
            linears_as_nn_linear(block)
        device = next(model.parameters()).device
        captured = [self._capture(model, chunk) for chunk in calibration.to(device).split(batch_size)]
        self.hidden = [h for h, _ in captured]
        self.calls = [[calls[i] for _, calls in captured] for i in range(len(self.blocks))]
        self.fp_target = fp_target
        self.target_damp = target_damp
        self.fp_hidden = [h.clone() for h in self.hidden] if fp_target or fp_stream else None
        self._stage_cache: dict[tuple, list[list[str]]] = {}

    def _capture(self, model: torch.nn.Module, chunk: torch.Tensor) -> tuple[torch.Tensor, list[_BlockCall]]:
        calls: list[_BlockCall] = []
        first: list[torch.Tensor] = []
        last = len(self.blocks) - 1

        def recorder(i: int):
            def forward(hidden_states, *args, **kwargs):
                if i == 0:
                    first.append(hidden_states)
                calls.append(_BlockCall(args, kwargs))
                if i == last:
                    raise _Stop
                return hidden_states

            return forward

        originals = [block.__dict__.get("forward") for block in self.blocks]  # instance-level forwards, if any
        try:
            for i, block in enumerate(self.blocks):
                block.forward = recorder(i)
            with torch.no_grad():
                model(chunk, use_cache=False)
        except _Stop:
            pass
        finally:
            for block, forward in zip(self.blocks, originals, strict=True):
                if forward is None:
                    del block.forward  # back to the class's forward: nothing left on the instance
                else:
                    block.forward = forward
        if len(calls) != len(self.blocks):
            raise RuntimeError(f"captured {len(calls)} block calls for {len(self.blocks)} blocks")
        return first[0], calls

    @torch.no_grad()
    def run_block(self, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of block ``i`` for the given input batches."""
        outputs = []
        for x, call in zip(hidden, self.calls[i], strict=False):
            out = self.blocks[i](x, *call.args, **call.kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    @torch.no_grad()
    def block_cosines(self, samples: int) -> list[float]:
        """Cosine similarity of each block's input and output, uncompressed, on about ``samples`` samples."""
        x, taken, cosines = [], 0, []
        for h in self.hidden:
            if taken >= samples:
                break
            x.append(h)
            taken += h.shape[0]
        for i in range(len(self.blocks)):
            y = self.run_block(i, x)
            sims = [
                torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
                for a, b in zip(x, y, strict=True)
            ]
            cosines.append(float(torch.stack(sims).mean()))
            x = y
        return cosines

    @torch.no_grad()
    def stages(self, i: int, linears: dict[str, torch.nn.Linear]) -> list[list[str]]:
        """The linears of block ``i`` grouped by the tensor they read, groups in call order.

        LLaMA: ``[[q, k, v], [o], [gate, up], [down]]``. Found from one forward of the first batch,
        cached for blocks of the same type and linear names.
        """
        key = (type(self.blocks[i]).__name__, tuple(sorted(linears)))
        if key not in self._stage_cache:
            calls: list[tuple[str, torch.Tensor]] = []
            handles = [lin.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
                       for name, lin in linears.items()]
            try:
                self.blocks[i](self.hidden[0], *self.calls[i][0].args, **self.calls[i][0].kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            groups: list[list[str]] = []
            tensors: list[torch.Tensor] = []
            for name, tensor in calls:
                if any(name in g for g in groups):
                    continue
                hit = next((g for g, t in zip(groups, tensors, strict=True) if t is tensor), None)
                if hit is None:
                    groups.append([name])
                    tensors.append(tensor)
                else:
                    hit.append(name)
            missing = sorted(set(linears) - {n for g in groups for n in g})
            if missing:
                raise RuntimeError(f"linears {missing} were not called in their block's forward")
            self._stage_cache[key] = groups
        return [list(g) for g in self._stage_cache[key]]

    def _inputs(self, i: int, x: torch.Tensor, call: _BlockCall, linears: dict[str, torch.nn.Linear],
                stop_at: str | None) -> dict[str, torch.Tensor]:
        """Run block ``i`` on ``x`` and return the inputs of ``linears``, stopping once ``stop_at`` is reached."""
        seen: dict[str, torch.Tensor] = {}

        def hook(_m, args, name):
            seen[name] = args[0]
            if name == stop_at:
                raise _Stop

        handles = [lin.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
                   for name, lin in linears.items()]
        try:
            self.blocks[i](x, *call.args, **call.kwargs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return seen

    @torch.no_grad()
    def statistics(
        self, i: int, linears: dict[str, torch.nn.Linear], originals: dict[str, torch.nn.Parameter] | None = None,
        stop_at: str | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per linear: ``{"H": 2X̂ᵀX̂/n}``, plus ``"A": 2XᵀX̂/n`` and ``"F": 2XᵀX/n`` with ``fp_target``.

        ``X̂`` are the inputs the block receives now (earlier blocks, and whatever linears of this block
        were already replaced, compressed); ``X`` those of the uncompressed model (the full-precision
        stream through ``originals``, the block's uncompressed weights). Linears fed the same tensor
        share one accumulator. The block forward stops at ``stop_at`` (the last linear needed).
        """
        fp = self.fp_target and originals is not None
        owner: dict[str, str] = {}
        acc: dict[str, dict[str, HessianAccumulator]] = {}
        fp_batches = self.fp_hidden if fp else [None] * len(self.hidden)
        for x, xf, call in zip(self.hidden, fp_batches, self.calls[i], strict=True):
            seen = self._inputs(i, x, call, linears, stop_at)
            if fp:
                current = {name: lin.weight for name, lin in self.blocks_linears(i, originals).items()}
                self._set_weights(i, originals)
                try:
                    seen_fp = self._inputs(i, xf, call, linears, stop_at)
                finally:
                    self._set_weights(i, current)
            if not owner:  # first batch: group the linears by the identity of their input tensor
                for name, tensor in seen.items():
                    owner[name] = next((o for o in owner.values() if seen[o] is tensor), name)
            for name in {owner[name] for name in seen}:
                dim = linears[name].in_features
                a = acc.setdefault(name, {"H": HessianAccumulator(dim, x.device)})
                a["H"].add(seen[name])
                if fp:
                    xq = seen[name].reshape(-1, dim).float()
                    xo = seen_fp[name].reshape(-1, dim).float()
                    for k, (u, v) in {"A": (xo, xq), "F": (xo, xo)}.items():
                        s = a.setdefault(k, HessianAccumulator(dim, x.device))
                        s.sum += (u.T @ v).double()
                        s.n_samples += u.shape[0]
        missing = sorted(set(linears) - set(owner))
        if missing:
            raise RuntimeError(f"linears {missing} were not called in their block's forward")
        return {name: {k: v.hessian() for k, v in acc[owner[name]].items()} for name in linears}

    @torch.no_grad()
    def hessians(self, i: int, linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
        """``H = 2XXᵀ/n`` of every linear's input; linears fed the same tensor (q/k/v, gate/up) share one."""
        return {name: st["H"] for name, st in self.statistics(i, linears).items()}

    def blocks_linears(self, i: int, names) -> dict[str, torch.nn.Linear]:
        """The modules of block ``i`` called ``names``."""
        return {name: self.blocks[i].get_submodule(name) for name in names}

    def _set_weights(self, i: int, weights: dict[str, torch.nn.Parameter]) -> None:
        for name, weight in weights.items():
            self.blocks[i].get_submodule(name).weight = weight

    def target_weight(self, W: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``W_t = W (A + λI)(H + λI)⁻¹``: the weight that best maps the actual inputs to the FP output.

        The ridge solution of ``min ‖XWᵀ − X̂W_tᵀ‖² + λ‖W_t − W‖²`` (``λ = target_damp·mean diag H``):
        it shrinks towards ``W``, not towards 0, so ``W_t = W`` exactly when ``X̂ = X`` (e.g. block 0).
        """
        Hd, dead = damp_hessian(stats["H"], self.target_damp)
        diag = torch.diagonal(stats["H"].double())
        lam = self.target_damp * (float(diag[~dead].mean()) if bool((~dead).any()) else 1.0)
        L = torch.linalg.cholesky(Hd)
        A = stats["A"].double() + lam * torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
        WA = W.double() @ A
        return torch.cholesky_solve(WA.T.contiguous(), L).T.to(W.dtype)

    @staticmethod
    def fp_relative_error(W: torch.Tensor, W_hat: torch.Tensor, stats: dict[str, torch.Tensor]) -> float:
        """``‖X Wᵀ − X̂ Ŵᵀ‖ / ‖X Wᵀ‖`` from the accumulated statistics (float64)."""
        Wd, Qd = W.double(), W_hat.double()
        ref = float(((Wd @ stats["F"].double()) * Wd).sum())
        cross = float(((Wd @ stats["A"].double()) * Qd).sum())
        own = float(((Qd @ stats["H"].double()) * Qd).sum())
        return max(ref - 2 * cross + own, 0.0) ** 0.5 / ref**0.5 if ref > 0 else 0.0

    @torch.no_grad()
    def compress(
        self,
        targets: list[dict[str, torch.nn.Linear]],
        compress: LinearCompressor,
        *,
        ns: list[int] | None = None,
        cosines: list[float] | None = None,
        progress: bool = True,
        desc: str = "blocks",
        true_sequential: bool = False,
        tune_steps: int = 0,
        tune_lr: float = 1e-2,
        tune_target: str = "block",
        tune_norms: bool = False,
    ) -> list[BlockRecord]:
        """Compress ``targets[i]`` of every block ``i`` in order; each block sees the compressed ones before it.

        ``compress`` may return a packed :class:`~pbs2p.BinarySparseTensor` or a dense tensor. Recorded
        errors are ``‖(W − Ŵ)X̂‖/‖WX̂‖`` on the calibration inputs, or with ``fp_target`` the error
        against the full-precision output, ``‖XWᵀ − X̂Ŵᵀ‖/‖XWᵀ‖``. With ``tune_steps`` the packed
        linears' scales (and with ``tune_norms`` the block's 1-D parameters) are then tuned on the
        block's output (:mod:`~pbs2p.pipeline.block_tune`): towards the uncompressed block's output on
        the same inputs (``tune_target="block"``) or towards the full-precision model's hidden states
        (``"fp"``, needs the runner's ``fp_stream``); the losses land in ``BlockRecord.tune``.
        """
        if tune_target not in ("block", "fp"):
            raise ValueError(f"tune_target must be 'block' or 'fp', got {tune_target!r}")
        if tune_steps > 0 and tune_target == "fp" and self.fp_hidden is None:
            raise ValueError("tune_target='fp' needs SequentialRunner(..., fp_stream=True)")
        records = []
        bar = tqdm(range(len(self.blocks)), desc=desc, disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            linears = targets[i]
            originals = {name: lin.weight for name, lin in linears.items()}
            errors = {}
            if linears:
                order = self.stages(i, linears)
                stages = order if true_sequential else [[name for group in order for name in group]]
                for stage in stages:
                    stats = self.statistics(i, self.blocks_linears(i, stage), originals, stop_at=stage[-1])
                    for name in stage:
                        lin, st = linears[name], stats.pop(name)
                        W = originals[name].detach()
                        if self.fp_target:
                            lin.weight = torch.nn.Parameter(self.target_weight(W, st), requires_grad=False)
                        weight = compress(i, name, lin, st["H"])
                        dense = weight.dequantize(torch.float32) if isinstance(weight, BinarySparseTensor) \
                            else weight.float()
                        if self.fp_target:
                            errors[name] = self.fp_relative_error(W.float(), dense, st)
                        else:
                            errors[name] = relative_output_error(W.float(), dense, st["H"])
                        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
            fp_next = None
            if self.fp_hidden is not None:  # advance the full-precision stream
                current = {name: lin.weight for name, lin in linears.items()}
                self._set_weights(i, originals)
                fp_next = self.run_block(i, self.fp_hidden)
                self._set_weights(i, current)
            tune = None
            if tune_steps > 0 and linears:
                if tune_target == "fp":
                    target = fp_next
                else:
                    current = {name: lin.weight for name, lin in linears.items()}
                    self._set_weights(i, originals)
                    target = self.run_block(i, self.hidden)
                    self._set_weights(i, current)
                tune = tune_block_scales(self.blocks[i], linears, self.hidden, self.calls[i], target,
                                         steps=tune_steps, lr=tune_lr, norms=tune_norms)
                self.hidden = self.run_block(i, self.hidden)
                tune["after"] = block_mse(self.hidden, target)
            else:
                self.hidden = self.run_block(i, self.hidden)
            if fp_next is not None:
                self.fp_hidden = fp_next
            record = BlockRecord(
                i,
                None if ns is None else ns[i],
                None if cosines is None else cosines[i],
                errors,
                time.perf_counter() - t0,
                tune,
            )
            records.append(record)
            bar.set_postfix(worst_err=f"{max(errors.values(), default=0.0):.3f}")
        return records
