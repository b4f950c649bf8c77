"""Pipeline parallelism over ``mlx.core.distributed``: each rank runs a contiguous run of
whole decoder layers, and a step passes the residual stream from rank to rank.

Rank ``r`` of ``n`` holds layers ``[lo, hi)`` (``PipelineStage.layers``) with their routed
experts, its own caches for them and nothing of the other layers. The layers it does not hold
stay in the model's list as ``RemoteLayer`` stand-ins without weights: the one just before
``lo`` receives the stream from rank ``r - 1``, the one at ``hi`` sends it on to rank ``r + 1``,
the others pass it through. The model's frame then shares the last layer's output (and any
tapped layer's, for drafts) from the rank that computed it with one ``all_sum``, so every rank
applies the same head to the same hidden state and they stay in lockstep. Embeddings, the final
norm and the head are held by every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from mach.cache.positions import AppendOnlyPositions
from mach.cache.snapshot import LayerState
from mach.errors import AdapterError, MachError
from mach.experts.parallel import ParallelMode, Shard


@dataclass(frozen=True)
class PipelineStage(Shard):
    """A rank that holds a contiguous run of whole decoder layers."""

    mode: ClassVar[ParallelMode] = "pipeline"
    described: ClassVar[str] = "pipeline parallelism"

    def layers(self, num_layers: int) -> tuple[int, int]:
        """The layers ``[lo, hi)`` this rank runs: contiguous, counts within one."""
        return self.rank * num_layers // self.size, (self.rank + 1) * num_layers // self.size

    def owner(self, layer: int, num_layers: int) -> int:
        """The rank that runs ``layer``."""
        return next(
            r
            for r in range(self.size)
            if r * num_layers // self.size <= layer < (r + 1) * num_layers // self.size
        )

    def share(self, outputs: Sequence[tuple[int, mx.array]], num_layers: int) -> list[mx.array]:
        """Each ``(layer, output)`` as the rank that runs ``layer`` computed it, on every rank.

        A rank contributes zeros for the outputs of layers it does not run; the zeros depend on
        its own output, so its send to the next rank is part of the same graph.
        """
        parts = [out if self.owner(layer, num_layers) == self.rank
                 else mx.depends(mx.zeros_like(out), out)
                 for layer, out in outputs]  # fmt: skip
        joined = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        summed = mx.distributed.all_sum(joined, group=self.group)
        if len(parts) == 1:
            return [summed]
        edges = [sum(p.shape[-1] for p in parts[:i]) for i in range(1, len(parts))]
        return list(mx.split(summed, edges, axis=-1))


class RemoteCache(AppendOnlyPositions):
    """The cache of a layer another rank runs: it holds nothing and counts positions, so
    offsets, trims and snapshots agree with the layers this rank runs.

    At a stage's edges ``state`` is the last pass's send or receive: a prefill chunk evaluates
    only the caches' states, and the send must run on this rank for the next one to go on.
    """

    kind = "remote"
    label = "remote layer's cache"
    state: mx.array | None = None

    def advance(self, n: int) -> None:
        self._offset += n

    @property
    def nbytes(self) -> int:
        return 0

    def export_state(self) -> LayerState:
        raise MachError("a pipeline stage holds no state for the layers other ranks run; the "
                        "prompt cache is off under pipeline parallelism")  # fmt: skip

    def load_state(self, state: LayerState) -> None:
        self.export_state()


class RemoteLayer(nn.Module):
    """A decoder layer another rank runs, in this rank's layer list.

    It has no parameters. Attributes it does not have come from the family's layer it stands
    in for (built, never loaded), so the family's ``make_cache`` still sees each layer's kind.
    """

    def __init__(self, layer: nn.Module, index: int, stage: PipelineStage, frame: nn.Module,
                 num_layers: int) -> None:  # fmt: skip
        super().__init__()  # type: ignore[no-untyped-call]
        # Kept out of the module tree: neither has parameters of this layer.
        object.__setattr__(self, "_original", layer)
        object.__setattr__(self, "_frame", frame)
        lo, hi = stage.layers(num_layers)
        self.receives = stage.rank > 0 and index == lo - 1
        self.sends = stage.rank < stage.size - 1 and index == hi
        self.index, self.stage = index, stage

    def __getattr__(self, key: str) -> Any:
        try:
            return super().__getattr__(key)
        except AttributeError:
            return getattr(self.__dict__["_original"], key)

    def __call__(self, h: mx.array, *rest: Any) -> mx.array:
        cache = rest[-1] if rest else None
        if isinstance(cache, RemoteCache):
            cache.advance(h.shape[1])
        if not (self.receives or self.sends):
            return h
        group, rank = self.stage.group, self.stage.rank
        wire = _embedding_dtype(self.__dict__["_frame"])
        if self.receives:
            out = mx.distributed.recv(h.shape, wire, rank - 1, group=group)
        else:
            if h.dtype != wire:
                raise MachError(
                    f"rank {rank}: the residual stream leaves layer {self.index - 1} as "
                    f"{h.dtype}, not the embedding's {wire}; pipeline parallelism needs one "
                    "dtype through the layers: load with --dtype or use --parallel expert"
                )
            out = mx.distributed.send(h, rank + 1, group=group)
        if isinstance(cache, RemoteCache):
            cache.state = out
        return out


def _frame(model: nn.Module) -> nn.Module:
    """The module whose ``layers`` are the model's decoder layers and that runs stages."""
    layers = model.layers
    for _, module in model.named_modules():
        if hasattr(type(module), "stage") and getattr(module, "layers", None) is layers:
            found: nn.Module = module
            return found
    raise AdapterError(
        f"{type(model).__name__}: its decoder frame does not run pipeline stages (no `stage` "
        "attribute beside its layers); use --parallel expert"
    )


def _embedding_dtype(frame: nn.Module) -> mx.Dtype:
    """The dtype of the first residual stream, the one every stage sends and receives: read
    from the loaded embedding's lazy graph (nothing is computed)."""
    embed = getattr(frame, "embed", None) or frame.embed_tokens
    return embed(mx.zeros((1, 1), dtype=mx.int32)).dtype  # type: ignore[no-any-return]


def install_stage(model: nn.Module, stage: PipelineStage) -> list[str]:
    """Replace the layers other ranks run with ``RemoteLayer`` stand-ins and give the frame
    ``stage``; returns the module paths of the replaced layers (whose weights stay unread)."""
    frame = _frame(model)
    layers: list[nn.Module] = frame.layers
    if len(layers) < stage.size:
        raise MachError(f"{len(layers)} decoder layers cannot be split over {stage.size} ranks; "
                        "start fewer ranks or use --parallel expert")  # fmt: skip
    paths = {id(module): path for path, module in model.named_modules()}
    lo, hi = stage.layers(len(layers))
    remote = []
    for i, layer in enumerate(layers):
        if not lo <= i < hi:
            remote.append(paths[id(layer)])
            layers[i] = RemoteLayer(layer, i, stage, frame, len(layers))
    frame.stage = stage
    return remote


def stage_caches(caches: list[Any], stage: PipelineStage) -> list[Any]:
    """``caches`` with those of the layers other ranks run replaced by ``RemoteCache``."""
    lo, hi = stage.layers(len(caches))
    return [c if lo <= i < hi else RemoteCache() for i, c in enumerate(caches)]
