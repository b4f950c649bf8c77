"""``PrefixCache``: the longest cached prefix of a prompt, from memory (L1) or disk (L2).

Prompts are cut into blocks of ``block_size`` tokens. The key of block ``i`` hashes the key of
block ``i - 1`` with block ``i``'s tokens (the chain starts from the model fingerprint), so one
key names a whole prefix and models never share keys. A snapshot is stored under the key of its
last block; a lookup walks the prompt's keys from the longest prefix down and takes the first
one either tier holds. L1 keeps snapshots in memory under a byte budget, least recently used
out first; an L1 miss falls through to the ``DiskKVCache``, whose hit is promoted to L1. Every
snapshot stored goes to both tiers.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mach.cache.base import SequenceCache
from mach.cache.disk import DiskKVCache
from mach.cache.snapshot import CacheSnapshot, LayerState

if TYPE_CHECKING:
    from mach.io.load import LoadedModel

BLOCK_SIZE = 64
DEFAULT_MEMORY_BYTES = 2 << 30
DEFAULT_DISK_BYTES = 16 << 30


def block_keys(seed: str, tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> list[str]:
    """The chain key of every full block of ``tokens``."""
    keys, previous = [], seed.encode()
    ids = np.asarray(tokens[: len(tokens) // block_size * block_size], dtype=np.int64)
    for start in range(0, ids.size, block_size):
        previous = hashlib.sha256(previous + ids[start : start + block_size].tobytes()).digest()
        keys.append(previous.hex()[:32])
    return keys


def _reach(snapshot: CacheSnapshot, tokens: Sequence[int], n: int, limit: int) -> int:
    """How many leading ``tokens`` a snapshot can stand for (0: none), given that its block
    chain matched the first ``n``: a cut-able one as far as it agrees, up to ``limit``."""
    held = snapshot.tokens
    if len(held) < n or held[:n] != list(tokens[:n]):
        return 0
    if not snapshot.sliceable:
        return n if len(held) == n else 0
    stop = min(len(held), limit)
    ahead = np.asarray(held[n:stop]) != np.asarray(tokens[n:stop])
    return n + (int(ahead.argmax()) if ahead.any() else stop - n)


class PrefixCache:
    """Snapshots of prompt prefixes for one model, shared by every request of an engine.

    ``stats()`` gives the counters a server reports: hits per tier, misses, tokens reused,
    bytes per tier and evictions.
    """

    def __init__(
        self,
        fingerprint: str,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        disk: DiskKVCache | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if disk is not None and disk.fingerprint != fingerprint:
            raise ValueError("the disk prompt cache was opened for a different model")
        self.fingerprint = fingerprint
        self.memory_bytes = memory_bytes
        self.disk = disk
        self.block_size = block_size
        self._memory: OrderedDict[str, CacheSnapshot] = OrderedDict()
        # Every shorter prefix of a sliceable snapshot, so prompts that share only their start
        # (one system prompt, many conversations) still meet: prefix key -> snapshot key.
        self._within: dict[str, str] = {}
        self._unwritten: list[tuple[str, CacheSnapshot]] = []
        self._memory_used = 0
        self._counts = dict.fromkeys(
            ("l1_hits", "l2_hits", "misses", "tokens_reused", "stores", "l1_evictions"), 0
        )

    @classmethod
    def for_model(
        cls,
        loaded: LoadedModel,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        directory: str | os.PathLike[str] | None = None,
        disk_bytes: int = DEFAULT_DISK_BYTES,
        block_size: int = BLOCK_SIZE,
    ) -> PrefixCache:
        """A prefix cache for a loaded model; with ``directory``, backed by a ``DiskKVCache``."""
        from mach.cache.fingerprint import model_fingerprint

        fingerprint = model_fingerprint(loaded)
        disk = DiskKVCache(directory, disk_bytes, fingerprint) if directory is not None else None
        return cls(fingerprint, memory_bytes, disk, block_size)

    def boundary(self, limit: int) -> int:
        """The last block boundary at or before ``limit`` tokens (where snapshots are taken)."""
        return limit // self.block_size * self.block_size

    def lookup(self, tokens: Sequence[int], limit: int | None = None) -> CacheSnapshot | None:
        """The snapshot of the longest cached prefix of ``tokens`` (at most ``limit`` long).

        Snapshots are found by their block chain. A KV-only snapshot is then used as far as it
        agrees with ``tokens``, block or not: it is cut to the common prefix.
        """
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        keys = block_keys(self.fingerprint, tokens[: self.boundary(limit)], self.block_size)
        for depth in range(len(keys), 0, -1):
            key, n = keys[depth - 1], depth * self.block_size
            candidates = []
            found = self._memory.get(key)
            tier = "l1_hits"
            if found is None and self.disk is not None and key in self.disk:
                found, tier = self.disk.get(key), "l2_hits"
                if found is not None:
                    self._remember(key, found)
            if found is not None:
                candidates.append((key, found, tier))
            if key in self._within and (longer := self._memory.get(self._within[key])):
                candidates.append((self._within[key], longer, "l1_hits"))
            best: tuple[int, str, CacheSnapshot, str] | None = None
            for owner, snapshot, source in candidates:
                reach = _reach(snapshot, tokens, n, limit)
                if reach and (best is None or reach > best[0]):
                    best = (reach, owner, snapshot, source)
            if best is None:
                continue
            reach, owner, snapshot, tier = best
            self._memory.move_to_end(owner)
            self._counts[tier] += 1
            self._counts["tokens_reused"] += reach
            return snapshot if reach == len(snapshot.tokens) else snapshot.truncated(reach)
        self._counts["misses"] += 1
        return None

    def resume(self, tokens: Sequence[int], cache: SequenceCache) -> int:
        """Load the longest cached prefix that leaves at least the last token to run into a
        fresh ``cache``; returns its length (0 on a miss)."""
        hit = self.lookup(tokens, len(tokens) - 1)
        if hit is None:
            return 0
        cache.load_state(hit.layers)
        return len(hit.tokens)

    def snapshot_at(self, prompt_tokens: int, resumed: int, cache: SequenceCache) -> int | None:
        """Where a prefill that resumed at ``resumed`` should take its snapshot, if anywhere.

        A KV-only cache is cut anywhere later, so it is snapshotted just before the last prompt
        token and the next turn of a conversation reuses all of this one. Other kinds (recurrent
        GDN state, rotating windows, compressed rows) cannot be cut: they are snapshotted at the
        last block boundary, where a later prompt's block chain can find them.
        """
        if all(layer.kind == "kv" for layer in cache) and prompt_tokens - 1 >= self.block_size:
            cut = prompt_tokens - 1
        else:
            cut = self.boundary(prompt_tokens - 1)
        return cut if cut > resumed else None

    def store(self, tokens: Sequence[int], layers: list[LayerState], defer: bool = False) -> None:
        """Keep the state after ``tokens`` in both tiers, under the key of its last full block.

        Only a KV-only state may end inside a block (it is cut to length when reused); others
        must end on a block boundary. ``defer`` keeps it in memory now and writes the disk tier
        at the next ``flush``, so an engine can hand out its first token before the disk write.
        """
        snapshot = CacheSnapshot(list(tokens), layers)
        if len(tokens) < self.block_size or (len(tokens) % self.block_size
                                             and not snapshot.sliceable):  # fmt: skip
            raise ValueError(
                f"snapshots of this cache are taken at block boundaries: {len(tokens)} tokens is "
                f"not a multiple of {self.block_size}"
            )
        key = block_keys(self.fingerprint, tokens, self.block_size)[-1]
        held = self._memory.get(key)
        if held is not None and held.tokens == snapshot.tokens:
            self._memory.move_to_end(key)
            return
        if held is not None:  # same full blocks, another tail: the newer one wins
            self._forget(key)
        self._counts["stores"] += 1
        self._remember(key, snapshot)
        if self.disk is not None and (held is not None or key not in self.disk):
            if defer:
                self._unwritten.append((key, snapshot))
            else:
                self.disk.put(key, snapshot)

    def flush(self) -> None:
        """Write the snapshots ``store(..., defer=True)`` kept back to the disk tier."""
        pending, self._unwritten = self._unwritten, []
        if self.disk is None:
            return
        for key, snapshot in pending:
            self.disk.put(key, snapshot)

    def _forget(self, key: str) -> None:
        old = self._memory.pop(key)
        self._memory_used -= old.nbytes
        self._within = {k: v for k, v in self._within.items() if v != key}

    def _remember(self, key: str, snapshot: CacheSnapshot) -> None:
        if snapshot.nbytes > self.memory_bytes:
            return
        self._memory[key] = snapshot
        self._memory_used += snapshot.nbytes
        if snapshot.sliceable:
            for shorter in block_keys(self.fingerprint, snapshot.tokens, self.block_size)[:-1]:
                self._within[shorter] = key
        while self._memory_used > self.memory_bytes:
            old_key, old = self._memory.popitem(last=False)
            self._memory_used -= old.nbytes
            self._counts["l1_evictions"] += 1
            self._within = {k: v for k, v in self._within.items() if v != old_key}

    def clear(self) -> None:
        """Forget the in-memory tier (the disk tier stays)."""
        self._memory.clear()
        self._within.clear()
        self._memory_used = 0

    def stats(self) -> dict[str, Any]:
        disk = self.disk.stats() if self.disk is not None else None
        return {
            **self._counts,
            "hits": self._counts["l1_hits"] + self._counts["l2_hits"],
            "l1_bytes": self._memory_used,
            "l1_entries": len(self._memory),
            "l2_bytes": disk["bytes"] if disk else 0,
            "l2_evictions": disk["evictions"] if disk else 0,
            "l2_rejected": disk["rejected"] if disk else 0,
            "evictions": self._counts["l1_evictions"] + (disk["evictions"] if disk else 0),
        }
