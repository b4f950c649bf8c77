"""``StreamingEmbedding``: token embeddings read row by row from disk instead of held in memory.

For large vocabularies whose input embedding is not tied to the output head: each call reads
only the rows of the tokens it embeds (one ``pread`` each, a few rows per decode step).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mach.experts.sources import DTYPES
from mach.tensors import TensorInfo


class StreamingEmbedding(nn.Module):
    """An embedding table that stays on disk; rows are read when tokens need them."""

    def __init__(self, weight: TensorInfo, dtype: mx.Dtype | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if weight.dtype not in DTYPES or len(weight.shape) != 2:
            raise ValueError(
                f"{weight.file}: {weight.name} ({weight.dtype}{list(weight.shape)}) cannot be "
                "streamed; only float embedding tables can"
            )
        self._info = weight
        self._storage, self._view = DTYPES[weight.dtype]
        self._dtype = dtype or self._view
        self._row = math.prod(weight.shape[1:]) * np.dtype(self._storage).itemsize
        self._fd = os.open(Path(weight.file), os.O_RDONLY)
        self.rows_read = 0

    def __call__(self, tokens: mx.array) -> mx.array:
        ids = np.asarray(tokens).astype(np.int64)
        unique, inverse = np.unique(ids, return_inverse=True)
        vocab = self._info.shape[0]
        if unique.size and (unique[0] < 0 or unique[-1] >= vocab):
            raise ValueError(f"token id out of range for a vocabulary of {vocab}")
        buf = bytearray(self._row * unique.size)
        view = memoryview(buf)
        for i, token in enumerate(unique):
            offset = self._info.start + int(token) * self._row
            got = os.preadv(self._fd, [view[i * self._row : (i + 1) * self._row]], offset)
            if got != self._row:
                raise OSError(f"{self._info.file}: short read of embedding row {token}")
        table = mx.array(np.frombuffer(buf, dtype=self._storage).reshape(unique.size, -1))
        if table.dtype != self._view:
            table = table.view(self._view)
        self.rows_read += int(unique.size)
        rows = table.astype(self._dtype)[mx.array(inverse.reshape(ids.shape))]
        return rows

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
