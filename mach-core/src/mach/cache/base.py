"""The protocol every per-sequence cache follows, and the per-model ``SequenceCache``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from mach.cache.snapshot import LayerState


@runtime_checkable
class LayerCache(Protocol):
    """One decoder layer's state for one batch of sequences."""

    kind: str
    """The cache backend (``kv``, ``rotating``, ``gdn`` ...), checked against the adapter's
    ``cache_backends``."""

    @property
    def offset(self) -> int:
        """How many positions the cache holds."""
        ...

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop positions (for speculative rollback)."""
        ...

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the cache holds."""
        ...

    def snapshot(self) -> Any:
        """An opaque value that ``restore`` brings the cache back to."""
        ...

    def restore(self, snapshot: Any) -> None: ...

    def export_state(self) -> LayerState:
        """The state at the current offset as named arrays and JSON-able metadata, sharing no
        buffer with the cache (prefix reuse across requests and processes)."""
        ...

    def load_state(self, state: LayerState) -> None:
        """Replace this (fresh) cache's contents with an exported state of the same kind."""
        ...


class SequenceCache(Sequence[LayerCache]):
    """The caches of every layer of a model; what ``model(tokens, cache=...)`` continues."""

    def __init__(
        self,
        layers: Sequence[LayerCache],
        factory: Callable[[], Sequence[LayerCache]] | None = None,
    ) -> None:
        self.layers = list(layers)
        self._factory = factory

    def new(self) -> SequenceCache:
        """An empty cache of the same kind, for another sequence."""
        if self._factory is None:
            raise ValueError("this cache was built without a factory; build caches with load_moe")
        return SequenceCache(self._factory(), self._factory)

    def __getitem__(self, index: int) -> LayerCache:  # type: ignore[override]
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerCache]:
        return iter(self.layers)

    @property
    def offset(self) -> int:
        """Positions processed so far (the first layer's count)."""
        return self.layers[0].offset if self.layers else 0

    def is_trimmable(self) -> bool:
        return all(c.is_trimmable() for c in self.layers)

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions from every layer."""
        if not self.is_trimmable():
            raise ValueError("this model's cache cannot be trimmed")
        return min((c.trim(n) for c in self.layers), default=0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def snapshot(self) -> list[Any]:
        """Every layer's snapshot (prefix reuse, speculative rollback)."""
        return [c.snapshot() for c in self.layers]

    def restore(self, snapshot: list[Any]) -> None:
        for layer, saved in zip(self.layers, snapshot, strict=True):
            layer.restore(saved)

    def export_state(self) -> list[LayerState]:
        """Every layer's portable state, evaluated."""
        states = [c.export_state() for c in self.layers]
        mx.eval([list(s.arrays.values()) for s in states])
        return states

    def load_state(self, states: list[LayerState]) -> None:
        if len(states) != len(self.layers):
            raise ValueError(
                f"the snapshot has {len(states)} layers, this model's cache {len(self.layers)}"
            )
        for layer, state in zip(self.layers, states, strict=True):
            layer.load_state(state)
