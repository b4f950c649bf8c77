"""Expert parallelism over ``mlx.core.distributed``: each rank holds a slice of every MoE
layer's experts, and one decode step exchanges only the routed experts' outputs.

Under ``mlx.launch`` every rank loads the same checkpoint with the same options. Attention,
norms, embeddings and shared experts are replicated; routed experts ``[lo, hi)`` of each layer
stay on rank ``r`` (``ExpertShard.span``). A MoE layer runs the routes to its own experts,
zeroes the others, and an ``all_sum`` gives every rank the outputs of all routes, so the rest
of the step is the same on every rank and they stay in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mach.errors import MachError
from mach.experts.matrix import ExpertMatrix, ExpertWeights
from mach.experts.sources import LayerSource
from mach.experts.store import ExpertStore, LayerExperts, ResidentLayer, ResidentStackedExpertCache

ParallelMode = Literal["expert", "pipeline"]


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks ``mlx.launch`` started, and what it holds."""

    rank: int
    size: int
    group: Any = None
    """The ``mx.distributed.Group`` the ranks exchange over."""
    mode: ClassVar[ParallelMode]
    described: ClassVar[str]
    """The layout in words, for messages (``expert parallelism over 2 ranks``)."""

    def describe(self) -> str:
        return f"{self.described} over {self.size} ranks"


@dataclass(frozen=True)
class ExpertShard(Shard):
    """A rank that holds a slice of every MoE layer's routed experts."""

    mode: ClassVar[ParallelMode] = "expert"
    described: ClassVar[str] = "expert parallelism"

    def span(self, num_experts: int) -> tuple[int, int]:
        """The experts ``[lo, hi)`` of a layer this rank holds: contiguous, sizes within one."""
        return self.rank * num_experts // self.size, (self.rank + 1) * num_experts // self.size


class RankLostError(MachError):
    """A collective failed: another rank stopped, or its host cannot be reached."""


@contextmanager
def collective_errors(shard: Shard | None) -> Iterator[None]:
    """Turn a failed exchange between ranks into a ``RankLostError`` that says what happened.

    MLX raises ``RuntimeError`` when a peer's connection drops mid-collective; under a shard any
    ``RuntimeError`` of the step is reported this way, its own text kept.
    """
    try:
        yield
    except RuntimeError as exc:
        if shard is None:
            raise
        raise RankLostError(
            f"rank {shard.rank} of {shard.size}: an exchange with the other ranks failed "
            f"({exc}); a rank stopped or its host is unreachable: see that rank's output"
        ) from exc


def expert_shard() -> ExpertShard | None:
    """The shard of this process when ``mlx.launch`` started several ranks, else ``None``."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    if group.size() < 2:
        return None
    return ExpertShard(group.rank(), group.size(), group)


def launched_shard(mode: ParallelMode) -> Shard | None:
    """This process's shard in ``mode`` under ``mlx.launch`` (``None``: one process)."""
    shard = expert_shard()
    if shard is None or mode == "expert":
        return shard
    from mach.layers.pipeline import PipelineStage

    return PipelineStage(shard.rank, shard.size, shard.group)


def _slice(matrix: ExpertMatrix, lo: int, hi: int) -> ExpertMatrix:
    def rows(a: mx.array | None) -> mx.array | None:
        return None if a is None else a[lo:hi]

    return replace(matrix, weight=matrix.weight[lo:hi], scales=rows(matrix.scales),
                   biases=rows(matrix.biases), bias=rows(matrix.bias))  # fmt: skip


def _slice_weights(weights: ExpertWeights, lo: int, hi: int) -> ExpertWeights:
    def part(m: ExpertMatrix | None) -> ExpertMatrix | None:
        return None if m is None else _slice(m, lo, hi)

    return ExpertWeights(down=_slice(weights.down, lo, hi), gate=part(weights.gate),
                         up=part(weights.up), gate_up=part(weights.gate_up))  # fmt: skip


def shard_resident(store: ResidentStackedExpertCache, shard: ExpertShard) -> ExpertStore:
    """``store`` cut to this rank's experts; only the slices are read at materialize."""
    layers: dict[str, ResidentLayer] = {}
    for prefix, layer in store.layers.items():
        lo, hi = shard.span(layer.weights.down.num_experts)
        layers[prefix] = ResidentLayer(_slice_weights(layer.weights, lo, hi))
    return ResidentStackedExpertCache(layers)


def shard_sources(sources: dict[str, LayerSource], shard: ExpertShard) -> dict[str, LayerSource]:
    """Each layer's on-disk experts cut to this rank's: its banks read only those."""
    out: dict[str, LayerSource] = {}
    for prefix, source in sources.items():
        lo, hi = shard.span(source.spec.num_experts)
        pieces = {name: replace(p, files=p.files[lo:hi], offsets=p.offsets[lo:hi])
                  for name, p in source.pieces.items()}  # fmt: skip
        records = source.records
        if records is not None:
            records = replace(records, offsets=records.offsets[lo:hi], crc32=records.crc32[lo:hi])
        out[prefix] = replace(source, spec=replace(source.spec, num_experts=hi - lo),
                              pieces=pieces, records=records)  # fmt: skip
    return out


class ShardedSwitch(nn.Module):
    """A routed-expert block on one rank: its own experts' routes, then a sum over ranks.

    ``__call__(x, indices)`` keeps the switch contract (``[..., k, D]``, router weights applied
    by the caller): routes to other ranks' experts come back as zeros from this rank and as
    their outputs from the rank that holds them.
    """

    def __init__(
        self, inner: nn.Module, num_experts: int, shard: ExpertShard, streamed: bool = False
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner = inner
        self.lo, self.hi = shard.span(num_experts)
        self.shard = shard
        self.streamed = streamed

    @property
    def experts(self) -> LayerExperts:
        return self.inner.experts  # type: ignore[no-any-return]

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        mine = (indices >= self.lo) & (indices < self.hi)
        # Another rank's route runs on one of this rank's experts and is then dropped: its
        # first one when all are resident; with a bank, one the call routes to anyway, so the
        # stand-in costs no read (the bank reads the ids back to the host regardless).
        fill = 0
        if self.streamed:
            ids = np.asarray(indices)
            routed = ids[(ids >= self.lo) & (ids < self.hi)]
            if routed.size == 0:
                nothing = mx.zeros((*indices.shape, x.shape[-1]), dtype=x.dtype)
                return mx.distributed.all_sum(nothing, group=self.shard.group)
            fill = int(routed.flat[0]) - self.lo
        local = mx.where(mine, indices - self.lo, fill).astype(indices.dtype)
        out = self.inner(x, local) * mine[..., None].astype(x.dtype)
        return mx.distributed.all_sum(out, group=self.shard.group)

    def stats(self) -> dict[str, Any]:
        inner = getattr(self.inner, "stats", None)
        report = inner() if callable(inner) else {}
        return {**report, "rank": self.shard.rank, "ranks": self.shard.size,
                "experts": [self.lo, self.hi]}  # fmt: skip
