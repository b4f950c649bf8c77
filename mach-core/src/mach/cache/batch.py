"""``BatchCache``: every layer's cache for the sequences of a batch, and which caches can batch.

A sequence prefills alone in its own ``SequenceCache``, then joins a batch with ``add``; a
finished or cancelled one leaves with ``keep``. Only cache kinds with a batched form join:
full-attention KV (full precision or TurboQuant), sliding-window KV that keeps no prefix, and
Gated DeltaNet state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from mach.cache.base import LayerCache, SequenceCache
from mach.cache.batch_gdn import BatchGDNCache
from mach.cache.batch_kv import BatchKVCache, BatchRotatingKVCache
from mach.cache.batch_turboquant import BatchTurboQuantCache
from mach.cache.gdn import GDNCache
from mach.cache.kv import KVCache
from mach.cache.rotating import RotatingKVCache
from mach.cache.turboquant import TurboQuantKVCache

BatchLayerCache = BatchKVCache | BatchRotatingKVCache | BatchGDNCache | BatchTurboQuantCache


def batch_support(layers: Sequence[Any]) -> str | None:
    """Why caches like ``layers`` cannot batch, or ``None`` when every layer can.

    The check is by exact class: a family's own cache type (a subclass included) may hold
    state the batched forms do not know about.
    """
    blocked = []
    for layer in layers:
        if type(layer) in (KVCache, GDNCache, TurboQuantKVCache):
            continue
        if type(layer) is RotatingKVCache and getattr(layer, "keep", 0) == 0:
            continue
        blocked.append(f"{type(layer).__name__} ({getattr(layer, 'kind', '?')})")
    if not blocked:
        return None
    return (f"its {', '.join(sorted(set(blocked)))} cache has no batched form; sequences decode "
            "one at a time")  # fmt: skip


def _batched(layer: LayerCache) -> BatchLayerCache:
    if isinstance(layer, RotatingKVCache):
        return BatchRotatingKVCache(layer.window)
    if isinstance(layer, GDNCache):
        return BatchGDNCache()
    if isinstance(layer, TurboQuantKVCache):
        return BatchTurboQuantCache(layer.bits)
    return BatchKVCache()


class BatchCache(Sequence[BatchLayerCache]):
    """What ``model(tokens [B, 1], cache=...)`` continues for a batch of sequences."""

    def __init__(self, template: SequenceCache) -> None:
        reason = batch_support(template.layers)
        if reason is not None:
            raise ValueError(f"this model cannot batch: {reason}")
        self.layers = [_batched(layer) for layer in template]
        self.rows = 0

    def add(self, cache: SequenceCache) -> None:
        """A sequence joins as the last row, with everything its own cache holds."""
        if len(cache) != len(self.layers):
            raise ValueError(f"the cache has {len(cache)} layers, the batch {len(self.layers)}")
        for mine, theirs in zip(self.layers, cache, strict=True):
            mine.add_row(theirs)  # type: ignore[arg-type]
        self.rows += 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); the others leave the batch."""
        if any(not 0 <= r < self.rows for r in rows):
            raise IndexError(f"rows {rows} are not all within the batch's {self.rows}")
        for layer in self.layers:
            layer.keep_rows(rows)
        self.rows = len(rows)

    def __getitem__(self, index: int) -> BatchLayerCache:  # type: ignore[override]
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[BatchLayerCache]:
        return iter(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
