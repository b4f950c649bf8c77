"""``DiskKVCache``: prefix snapshots in a directory, kept under a byte budget, shared safely.

Each entry is one safetensors file named by its prefix key. Its header carries the model
fingerprint, the token count and a checksum of the arrays; an entry whose fingerprint, size or
checksum does not match is removed with a warning and never used. Writes go to a temporary
file renamed into place, so a reader sees a whole entry or none. Writing and eviction hold an
exclusive ``fcntl`` lock on ``.lock`` in the directory, so processes sharing it never evict
what another is writing or overshoot the budget together. Reads take no lock: a rename or
unlink never disturbs a file already open. The least recently used entries (by modification
time, which a hit refreshes) go first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

from mach.cache.snapshot import FORMAT_VERSION, CacheSnapshot, checksum
from mach.errors import MachError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
STALE_TEMP_SECONDS = 600
"""A temporary file this old belongs to a writer that died; eviction removes it."""


class DiskKVCache:
    """Prefix snapshots of one model in ``directory``, at most ``max_bytes`` of files."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, fingerprint: str) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the disk prompt cache needs a positive byte budget, got {max_bytes}")
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MachError(
                f"{self.directory}: cannot be used as the prompt cache folder "
                f"({exc.strerror or exc}); give a folder mach may create and write"
            ) from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise MachError(
                f"{self.directory}: the prompt cache folder is not writable; give one that is"
            )
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.evictions = 0
        self.rejected = 0
        self.writes = 0

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get(self, key: str) -> CacheSnapshot | None:
        """The entry for ``key``, or ``None`` when absent or unusable (then it is removed)."""
        path = self.path(key)
        try:
            identity = path.stat().st_ino
            loaded = mx.load(str(path), return_metadata=True)
        except FileNotFoundError:
            return None
        except Exception as exc:  # any unreadable file is discarded the same way
            self._reject(path, identity, f"unreadable ({exc})")
            return None
        arrays: dict[str, mx.array] = loaded[0]  # type: ignore[index, assignment]
        header: dict[str, str] = loaded[1]  # type: ignore[index, assignment]
        problem = self._problem(arrays, header)
        if problem is not None:
            self._reject(path, identity, problem)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        return CacheSnapshot.unflatten(arrays, json.loads(header["mach.layers"]))

    def _problem(self, arrays: dict[str, mx.array], header: dict[str, str]) -> str | None:
        if header.get("mach.format") != str(FORMAT_VERSION):
            return f"written by cache format {header.get('mach.format')!r}"
        if header.get("mach.fingerprint") != self.fingerprint:
            return "written for a different model, dtype or mach format"
        if "tokens" not in arrays or str(arrays["tokens"].size) != header.get("mach.tokens"):
            return "its token count does not match its header"
        if checksum(arrays) != header.get("mach.checksum"):
            return "its checksum does not match (corrupt)"
        return None

    def _reject(self, path: Path, identity: int, why: str) -> None:
        self.rejected += 1
        log.warning("prompt cache: removing %s: %s", path, why)
        with self._locked(), contextlib.suppress(FileNotFoundError):
            # Another process may have replaced the file since it was read; keep that one.
            if path.stat().st_ino == identity:
                path.unlink()

    def put(self, key: str, snapshot: CacheSnapshot) -> bool:
        """Write ``snapshot`` under ``key`` and evict down to the budget; ``False`` if it cannot
        fit at all."""
        arrays, meta = snapshot.flatten()
        header = {
            "mach.format": str(FORMAT_VERSION),
            "mach.fingerprint": self.fingerprint,
            "mach.tokens": str(len(snapshot.tokens)),
            "mach.checksum": checksum(arrays),
            "mach.layers": json.dumps(meta),
        }
        size = sum(a.nbytes for a in arrays.values())
        if size > self.max_bytes:
            return False
        temp = self.directory / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp{SUFFIX}"
        try:
            mx.save_safetensors(str(temp), arrays, metadata=header)
            with self._locked():
                os.replace(temp, self.path(key))
                self.writes += 1
                self._evict(keep=key)
        except (OSError, RuntimeError) as exc:
            # A full or vanished disk costs the reuse, never the request being served.
            log.warning("prompt cache: cannot write %s: %s", self.path(key), exc)
            return False
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        return True

    def _entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for path in self.directory.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.name.startswith("."):
                if path.name.endswith(f".tmp{SUFFIX}") and (
                    time.time() - stat.st_mtime > STALE_TEMP_SECONDS
                ):
                    path.unlink(missing_ok=True)
                continue
            if path.suffix == SUFFIX:
                found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def _evict(self, keep: str | None = None) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path.name == f"{keep}{SUFFIX}":
                continue
            path.unlink(missing_ok=True)
            total -= size
            self.evictions += 1

    @property
    def nbytes(self) -> int:
        """Bytes of entries in the directory now (every process's)."""
        return sum(size for _, size, _ in self._entries())

    def stats(self) -> dict[str, Any]:
        return {"bytes": self.nbytes, "evictions": self.evictions, "rejected": self.rejected,
                "writes": self.writes}  # fmt: skip
