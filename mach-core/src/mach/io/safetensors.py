"""Read and validate safetensors headers without touching tensor data."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from mach.errors import CorruptCheckpointError
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
    byte range disagrees with its dtype and shape, or the file is shorter than the header says.
    """
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
    furthest = 0
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
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected or begin < 0:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} "
                f"needs {expected}"
            )
        furthest = max(furthest, end)
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    if furthest > data_len:
        raise CorruptCheckpointError(
            f"{path}: truncated: the header describes {furthest} bytes of tensor data but the "
            f"file holds {data_len}; re-download or re-convert it"
        )
    return tensors
