"""``ExpertReader``: expert records read with ``os.pread`` from a thread pool."""

from __future__ import annotations

import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mach.errors import CheckpointError
from mach.experts.sources import LayerSource


class ExpertReadError(CheckpointError):
    """Reading an expert from disk failed or returned bytes that fail their checksum."""


@dataclass
class ReadStats:
    reads: int = 0
    bytes: int = 0
    seconds: float = 0.0
    """Wall time spent waiting for batches of reads."""


@dataclass
class ExpertReader:
    """Reads experts for stores; several reads in flight, file descriptors kept open."""

    workers: int = 8
    verify: bool = True
    stats: ReadStats = field(default_factory=ReadStats)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mach-expert-read")
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise ExpertReadError(f"{path}: cannot open expert file ({exc})") from exc
                self._fds[path] = fd
            return fd

    def _pread(self, path: Path, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        view = memoryview(buf)
        fd, done = self._fd(path), 0
        while done < nbytes:
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise ExpertReadError(
                    f"{path}: read at byte {offset + done} failed ({exc})"
                ) from exc
            if got == 0:
                raise ExpertReadError(
                    f"{path}: file ended at byte {offset + done} while reading an expert "
                    f"({nbytes} bytes from {offset}); the file was truncated or replaced"
                )
            done += got
        return buf

    def _read_one(self, source: LayerSource, expert: int) -> dict[str, memoryview]:
        record = source.records
        if record is not None:
            start = record.offsets[expert]
            buf = self._pread(record.file, start, record.nbytes)
            if self.verify and zlib.crc32(buf, record.described) != record.crc32[expert]:
                raise ExpertReadError(
                    f"{record.file}: expert {expert} of {source.prefix} fails its checksum: the "
                    "record or its entry in index.json changed since `mach convert` wrote them; "
                    "re-run `mach convert`"
                )
            view = memoryview(buf)
            return {
                name: view[p.offsets[expert] - start : p.offsets[expert] - start + p.nbytes]
                for name, p in source.pieces.items()
            }
        return {
            name: memoryview(self._pread(p.files[expert], p.offsets[expert], p.nbytes))
            for name, p in source.pieces.items()
        }

    def read(self, source: LayerSource, experts: list[int]) -> list[dict[str, memoryview]]:
        """Every piece of each expert, reading them concurrently."""
        if not experts:
            return []
        start = time.perf_counter()
        futures = [self._pool.submit(self._read_one, source, e) for e in experts]
        results = [f.result() for f in futures]
        self.stats.seconds += time.perf_counter() - start
        self.stats.reads += len(experts)
        self.stats.bytes += len(experts) * source.expert_bytes
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
