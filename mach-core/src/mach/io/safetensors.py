"""Read and validate safetensors headers without touching tensor data."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from mach.errors import CorruptCheckpointError, MissingFileError
from mach.tensors import TensorInfo

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check it against the file's size.

    Raises ``CorruptCheckpointError`` naming the file when the header is unreadable, a tensor's
    byte range disagrees with its dtype and shape, the ranges overlap or leave gaps, or the file
    is shorter or longer than the header says; ``MissingFileError`` when ``path`` is a folder.
    """
    if path.is_dir():
        raise MissingFileError(
            f"{path}: is a folder, not a safetensors file; move the weights out of it or remove it"
        )
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes is too short to be a safetensors file; re-download it"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER):
            raise CorruptCheckpointError(
                f"{path}: header length {header_len} exceeds the file ({size} bytes); the file "
                "is truncated or not safetensors; re-download or re-convert it"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{path}: malformed header entry for {name!r}") from exc
        if dtype not in DTYPE_SIZES:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if begin < 0 or end < begin:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has data_offsets [{begin}, {end}], which do not form a "
                "byte range; the header is corrupt: re-download or re-convert the file"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} "
                f"needs {expected}"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    _check_tiling(path, tensors, data_start, data_len)
    return tensors


def _check_tiling(
    path: Path, tensors: dict[str, TensorInfo], data_start: int, data_len: int
) -> None:
    """Sorted by offset, the tensors cover the data buffer from byte 0 to its end exactly once.

    Overlapping ranges would make two tensors share bytes and load as garbage, so they are refused
    as the safetensors reference implementation refuses them.
    """
    covered, last = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        begin, end = info.start - data_start, info.end - data_start
        if last is not None and begin < covered:
            raise CorruptCheckpointError(
                f"{path}: tensors {last.name!r} (bytes {last.start - data_start}-"
                f"{last.end - data_start}) and {info.name!r} (bytes {begin}-{end}) overlap; "
                "the header is corrupt: re-download or re-convert the file"
            )
        if begin > covered:
            after = f"after tensor {last.name!r}" if last else "at the start of the data"
            raise CorruptCheckpointError(
                f"{path}: bytes {covered}-{begin} {after} belong to no tensor (the next is "
                f"{info.name!r}); the header is corrupt: re-download or re-convert the file"
            )
        covered, last = end, info
    if covered > data_len:
        raise CorruptCheckpointError(
            f"{path}: truncated: the header describes {covered} bytes of tensor data but the "
            f"file holds {data_len}; re-download or re-convert it"
        )
    if covered < data_len:
        raise CorruptCheckpointError(
            f"{path}: the header describes {covered} bytes of tensor data but the file holds "
            f"{data_len}; the header does not match the file: re-download or re-convert it"
        )
