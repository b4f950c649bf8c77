"""Decode passes as compiled graphs: traced once per pass length and cache size, then replayed.

Building a decode step op by op from Python costs more than the step itself on a GPU, and a
sizeable share of it on a CPU. ``mx.compile`` traces the model's forward once and replays the
graph, fusing its elementwise chains. For one trace to serve every position, the caches enter
as explicit state: each ``KVCache``'s buffers and the write position (an array) go in, the
written buffers come out, and ``TracedKVCache`` stands in for the cache during the trace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import SequenceCache
from mach.cache.batch_kv import BatchKVCache
from mach.cache.gdn import GDNCache, TracedGDNCache
from mach.cache.kv import KVCache
from mach.cache.traced_kv import TracedKVCache
from mach.experts.dispatch import Dispatch

MAX_COMPILED_TOKENS = 64
"""The longest pass that runs compiled: decode steps, verify passes and draft blocks.
Prompt chunks have too many lengths to be worth a trace each."""

_Key = tuple[Any, ...]
Buffers = list[tuple[mx.array, mx.array]]


def compile_blocker() -> str | None:
    """Why ``mx.compile`` cannot run on the default device here, or ``None`` when it can.

    On a CPU, MLX builds fused kernels with the system's C++ compiler; without one, compiled
    graphs fail when evaluated. A tiny graph finds out once per process and device.
    """
    return _probe("gpu" if mx.default_device() == mx.gpu else "cpu")


@functools.cache
def _probe(device: str) -> str | None:
    try:
        probe = mx.compile(lambda x: mx.exp(x) * 2.0 + 1.0)
        mx.eval(probe(mx.ones(4)))
    except Exception as exc:  # any failure means: run uncompiled
        return f"mx.compile fails on the {device} here ({str(exc).splitlines()[0]})"
    return None


def steps_compile() -> bool:
    """Whether one-token passes (plain decode steps) run compiled on the default device.

    A compiled pass attends over the whole cache buffer with a mask. CUDA's single-query
    attention kernel takes no mask, so there a compiled step falls back to unfused attention
    and measured slower than the uncompiled step, which reads exactly its keys. Longer passes
    (verify passes, draft blocks) mask on every device and compile everywhere.
    """
    return mx.default_device() == mx.cpu or not mx.cuda.is_available()


STEPS_ON_CUDA = "one-token steps run uncompiled on CUDA (its single-query attention takes no mask)"


def over_caches(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function(traced_caches, *inputs)`` compiled, as ``run(caches, writes, keeps, *inputs)``.

    ``caches`` are every layer's cache, holding positions: ``KVCache`` and ``GDNCache``
    layers, or a batch's ``BatchKVCache`` rows. The pass writes ``writes`` positions after
    their offset, and ``keeps`` of them stay (the rest are a guess, like a draft block). A
    ``GDNCache`` that is recording (a verify pass) hands out each token's state as well.
    """
    compiled: dict[tuple[bool, bool], Callable[..., Any]] = {}
    layout: list[str] = []

    def traced(start: mx.array, positions: mx.array | None, padding: mx.array | None,
               buffers: list[tuple[mx.array, mx.array]], recording: bool,
               inputs: tuple[Any, ...]) -> Any:  # fmt: skip
        caches: list[Any] = [
            TracedGDNCache(*arrays, start, recording) if kind == "gdn"
            else TracedKVCache(*arrays, start, positions, padding)
            for kind, arrays in zip(layout, buffers, strict=True)
        ]  # fmt: skip
        out = function(caches, *inputs)
        return out, [layer.written() for layer in caches]

    def variant(ragged: bool, recording: bool) -> Callable[..., Any]:
        # A Python flag is fixed when a graph is traced, so each setting has its own graph.
        if (ragged, recording) not in compiled:
            if ragged:

                def pure(start: mx.array, positions: mx.array, padding: mx.array,
                         buffers: Buffers, *inputs: Any) -> Any:  # fmt: skip
                    return traced(start, positions, padding, buffers, recording, inputs)

                compiled[(ragged, recording)] = mx.compile(pure)
            else:

                def plain(start: mx.array, buffers: Buffers, *inputs: Any) -> Any:
                    return traced(start, None, None, buffers, recording, inputs)

                compiled[(ragged, recording)] = mx.compile(plain)
        return compiled[(ragged, recording)]

    def run(caches: Sequence[Any], writes: int, keeps: int, *inputs: Any) -> Any:
        kinds = ["gdn" if isinstance(layer, GDNCache) else "kv" for layer in caches]
        if not layout:
            layout.extend(kinds)
        assert kinds == layout, "a compiled pass serves one model's layers"
        buffers = [(layer.conv_state, layer.state) if isinstance(layer, GDNCache)
                   else layer.reserve(writes) for layer in caches]  # fmt: skip
        recording = any(getattr(layer, "recording", False) for layer in caches)
        first = caches[0]
        if isinstance(first, BatchKVCache):
            # Every row's sequence ends at the buffer's ``length``: the rows write there.
            out, written = variant(True, recording)(
                mx.array(first.length, dtype=mx.int32),
                mx.array(first.positions, dtype=mx.int32),
                mx.array(first.padding, dtype=mx.int32),
                buffers,
                *inputs,
            )
        else:
            start = mx.array(first.offset, dtype=mx.int32)
            out, written = variant(False, recording)(start, buffers, *inputs)
        for layer, state in zip(caches, written, strict=True):
            if isinstance(layer, GDNCache):
                conv_state, recurrent, steps = state
                layer.update(conv_state, recurrent, writes, steps or None)
            else:
                layer.commit(*state, keeps)
        return out

    return run


class CompiledPasses:
    """``passes(tokens [L], cache, hidden_layers=None)``: the model's forward over ``cache``.

    The result is what ``model(tokens[None], cache=cache, hidden_layers=...)`` gives. A pass
    runs compiled when every layer's cache is a ``KVCache`` that already holds positions and
    the pass is at most ``MAX_COMPILED_TOKENS`` long; any other pass runs the model directly,
    so the same object serves prefill too. One trace per pass length, cache buffer size (it
    grows in steps of 256 positions) and set of tapped layers, shared by every request.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled = 0
        """Passes that ran compiled so far."""
        self._functions: dict[tuple[int, ...] | None, Callable[..., Any]] = {}
        self._dispatch = [m for m in model.modules() if isinstance(m, Dispatch)]
        self._tallies: dict[_Key, list[dict[str, int]]] = {}
        self._batched: Callable[..., Any] | None = None
        self.model_blocker = _host_work(model)
        """What in the model reads arrays on the host mid-pass (``None``: nothing)."""

    def blocker(self, cache: Sequence[Any]) -> str | None:
        """Why passes over ``cache`` cannot run compiled, or ``None`` when they can."""
        if self.model_blocker is not None:
            return self.model_blocker
        kinds = sorted({type(layer).__name__ for layer in cache
                        if type(layer) not in (KVCache, GDNCache)})  # fmt: skip
        if kinds:
            return f"layers with {', '.join(kinds)} run uncompiled"
        return compile_blocker()

    def __call__(
        self,
        tokens: mx.array,
        cache: SequenceCache,
        hidden_layers: Sequence[int] | None = None,
    ) -> Any:
        layers: list[Any] = list(cache)
        length = tokens.shape[0]
        if (length > MAX_COMPILED_TOKENS or (length == 1 and not steps_compile())
                or self.blocker(layers) is not None
                or not all(_holds(layer) for layer in layers)):  # fmt: skip
            if hidden_layers is None:
                return self.model(tokens[None], cache=cache)
            return self.model(tokens[None], cache=cache, hidden_layers=hidden_layers)
        taps = tuple(hidden_layers) if hidden_layers is not None else None
        sizes = tuple(layer.recording if isinstance(layer, GDNCache)
                      else layer.reserve(length)[0].shape[2] for layer in layers)  # fmt: skip
        key = (taps, length, sizes)
        before = [m.counters() for m in self._dispatch] if key not in self._tallies else None
        out = self._function(taps)(layers, length, length, tokens)
        self._tally(key, before)
        self.compiled += 1
        return out

    def batch_step(self, tokens: mx.array, batch: Sequence[Any]) -> mx.array:
        """``model(tokens [B, L], cache=batch)`` for a continuous batch's ``BatchCache``:
        compiled when every layer is a ``BatchKVCache`` holding positions."""
        layers = list(batch)
        length = tokens.shape[1]
        if (length > MAX_COMPILED_TOKENS or self.model_blocker is not None
                or compile_blocker() is not None
                or any(type(layer) is not BatchKVCache or layer.keys is None
                       for layer in layers)):  # fmt: skip
            out: mx.array = self.model(tokens, cache=batch)
            return out
        key = ("batch", *tokens.shape, tuple(layer.reserve(length)[0].shape[2] for layer in layers))
        before = [m.counters() for m in self._dispatch] if key not in self._tallies else None
        if self._batched is None:
            model = self.model

            def forward(caches: list[TracedKVCache], inputs: mx.array) -> Any:
                return model(inputs, cache=caches)

            self._batched = over_caches(forward)
        out = self._batched(layers, length, length, tokens)
        self._tally(key, before)
        self.compiled += 1
        return out

    def _function(self, taps: tuple[int, ...] | None) -> Callable[..., Any]:
        if taps not in self._functions:
            model = self.model

            def forward(caches: list[TracedKVCache], tokens: mx.array) -> Any:
                return model(tokens[None], cache=caches, hidden_layers=taps)

            self._functions[taps] = over_caches(forward)
        return self._functions[taps]

    def _tally(self, key: _Key, before: list[dict[str, int]] | None) -> None:
        """Dispatch counters move only while a pass is traced; replay that change on reuse."""
        if before is not None:
            self._tallies[key] = [
                {name: now[name] - then[name] for name in now}
                for now, then in zip((m.counters() for m in self._dispatch), before, strict=True)
            ]
            return
        for module, change in zip(self._dispatch, self._tallies[key], strict=True):
            module.add_counters(change)


def _host_work(model: nn.Module) -> str | None:
    from mach.experts.dispatch import GatherSwitchGLU
    from mach.experts.parallel import ShardedSwitch
    from mach.experts.store import ResidentLayer
    from mach.layers.pipeline import RemoteLayer
    from mach.layers.streaming_embedding import StreamingEmbedding

    for module in model.modules():
        if isinstance(module, ShardedSwitch):
            return "experts sharded across ranks exchange outputs between uncompiled passes"
        if isinstance(module, RemoteLayer):
            return "pipeline stages pass hidden states between uncompiled passes"
        if isinstance(module, Dispatch) and not isinstance(module, GatherSwitchGLU):
            return "the per-expert dispatch loop reads routes on the host"
        if isinstance(module, Dispatch) and not isinstance(module.experts, ResidentLayer):
            return "streamed experts are looked up on the host for every layer"
        if isinstance(module, StreamingEmbedding):
            return "the streaming embedding reads its rows from disk"
    return None


def compile_report(passes: CompiledPasses | None, cache: Sequence[Any],
                   batched: bool = False) -> dict[str, Any]:  # fmt: skip
    """Whether decode passes over ``cache`` (a batch of such caches when ``batched``) run
    compiled, and if not (or not all), why."""
    if passes is None:
        reason: str | None = "compiling is off (--no-compile)"
    else:
        reason = passes.blocker(cache)
    if reason is None and not steps_compile() and not batched:
        return {"compiled": True, "reason": STEPS_ON_CUDA}
    return {"compiled": reason is None, "reason": reason}


def _holds(layer: Any) -> bool:
    """Whether a layer's cache already holds state a compiled pass can take in."""
    if isinstance(layer, GDNCache):
        return layer.conv_state is not None and layer.state is not None
    return getattr(layer, "keys", None) is not None
