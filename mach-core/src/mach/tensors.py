"""Where a checkpoint tensor's bytes sit on disk.

Below ``io/`` (which reads safetensors headers into it) and the readers that ``pread`` those
bytes (``experts/``, ``layers/``), so neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start
