"""``AppendOnlyPositions``: rollback and snapshots for caches that only append positions."""

from __future__ import annotations


class AppendOnlyPositions:
    """``offset``, ``trim``, ``snapshot`` and ``restore`` for a cache that only appends.

    Positions before the offset are never rewritten, so the offset alone is a snapshot and
    trimming only moves it back. ``label`` names the cache in errors.
    """

    label = "KV cache"
    _offset: int = 0

    @property
    def offset(self) -> int:
        return self._offset

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._offset, n)
        self._offset -= n
        return n

    def snapshot(self) -> int:
        """Earlier positions are never rewritten, so the offset is the whole snapshot."""
        return self._offset

    def restore(self, snapshot: int) -> None:
        """Go back to an earlier snapshot (positions after it are dropped)."""
        if snapshot > self._offset:
            raise ValueError(f"cannot restore a {self.label} forward (snapshot at {snapshot}, "
                             f"cache at {self._offset})")  # fmt: skip
        self._offset = snapshot
