"""Portable cache state: one layer's arrays and metadata, and a whole prefix's snapshot.

A ``LayerState`` is what ``LayerCache.export_state`` returns and ``load_state`` takes: named
arrays plus a JSON-able dictionary, so a snapshot can live in memory or in a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

FORMAT_VERSION = 2
"""Bumped whenever the layout of exported state changes; part of every model fingerprint."""


@dataclass
class LayerState:
    """One layer's cache at a position: its kind, named arrays (batch 1) and metadata."""

    kind: str
    arrays: dict[str, mx.array]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def owned(array: mx.array | None) -> mx.array | None:
    """A copy that shares no buffer with the live cache (a slice would pin all of it)."""
    return None if array is None else mx.contiguous(array)


def present(**arrays: mx.array | None) -> dict[str, mx.array]:
    """The given arrays that exist, each as an owned copy."""
    return {name: a for name, a in ((n, owned(v)) for n, v in arrays.items()) if a is not None}


def check_kind(state: LayerState, kind: str) -> None:
    if state.kind != kind:
        raise ValueError(f"cannot load {state.kind!r} cache state into a {kind!r} cache")


@dataclass
class CacheSnapshot:
    """Every layer's state after ``tokens``: enough to continue the sequence from there."""

    tokens: list[int]
    layers: list[LayerState]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers) + 4 * len(self.tokens)

    @property
    def sliceable(self) -> bool:
        """Whether every layer holds plain per-position rows, so a shorter prefix is a slice."""
        return all(layer.kind == "kv" for layer in self.layers)

    def truncated(self, n: int) -> CacheSnapshot:
        """The state after the first ``n`` tokens, cut from a sliceable snapshot."""
        if not self.sliceable or not 0 < n <= len(self.tokens):
            raise ValueError(f"cannot cut this snapshot to {n} tokens")
        layers = [
            LayerState(layer.kind, {k: a[..., :n, :] for k, a in layer.arrays.items()},
                       {**layer.meta, "offset": n})
            for layer in self.layers
        ]  # fmt: skip
        return CacheSnapshot(self.tokens[:n], layers)

    def flatten(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        """Arrays named ``<layer>.<name>`` (and ``tokens``), and the layers' kinds and meta."""
        arrays = {f"{i}.{name}": a for i, layer in enumerate(self.layers)
                  for name, a in layer.arrays.items()}  # fmt: skip
        arrays["tokens"] = mx.array(self.tokens, dtype=mx.int32)
        meta = {"layers": [{"kind": layer.kind, "meta": layer.meta} for layer in self.layers]}
        return arrays, meta

    @classmethod
    def unflatten(cls, arrays: dict[str, mx.array], meta: dict[str, Any]) -> CacheSnapshot:
        layers = [LayerState(entry["kind"], {}, entry["meta"]) for entry in meta["layers"]]
        tokens: list[int] = arrays["tokens"].tolist()  # type: ignore[assignment]
        for name, array in arrays.items():
            if name == "tokens":
                continue
            index, _, key = name.partition(".")
            layers[int(index)].arrays[key] = array
        return cls(tokens, layers)


def checksum(arrays: dict[str, mx.array]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        # uint8 view: numpy has no bfloat16, and the bytes are what must match.
        flat = mx.contiguous(array).reshape(-1).view(mx.uint8) if array.size else None
        if flat is not None:
            digest.update(np.asarray(flat).tobytes())
    return digest.hexdigest()
