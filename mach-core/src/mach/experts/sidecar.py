"""The engine's expert format: ``expert_sidecar/layer_XX.bin`` plus a versioned ``index.json``.

Each layer file holds one fixed-size record per expert, in expert order. A record is every
piece of that expert (gate, up and down weights, their quantization scales and biases, expert
biases) back to back, padded to the index's alignment so records start on page boundaries. The
index names each piece's dtype, per-expert shape and offset inside the record, and a CRC-32 of
each record. The CRC-32 runs over the index's description of the layer's records and then the
record's bytes, so a corrupt or truncated file, or an edited index, is caught instead of
producing wrong output.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mach.errors import CorruptCheckpointError, MissingFileError
from mach.experts.sources import DTYPES, LayerSource, Piece, Record
from mach.experts.switch import SwitchSpec
from mach.files import member_path

SIDECAR_DIR = "expert_sidecar"
INDEX_FILE = "index.json"
FORMAT = "mach-expert-sidecar"
VERSION = 2
ALIGNMENT = 4096
_REBUILD = "the index was edited or is corrupt: re-run `mach convert`"


class _Part(NamedTuple):
    """One piece of every record, as the index describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _description_crc(prefix: str, record_bytes: int, parts: list[_Part]) -> int:
    """CRC-32 of what the index says about a layer's records; each record's CRC continues it."""
    listed = [[p.name, p.dtype, list(p.shape), p.offset, p.nbytes] for p in parts]
    text = json.dumps([prefix, record_bytes, listed], separators=(",", ":"))
    return zlib.crc32(text.encode())


def layer_file_name(layer: int) -> str:
    return f"layer_{layer:02d}.bin"


def has_sidecar(root: Path) -> bool:
    return (root / SIDECAR_DIR / INDEX_FILE).is_file()


def write_layer(
    root: Path, prefix: str, layer: int, parts: Mapping[str, np.ndarray], dtypes: Mapping[str, str]
) -> dict[str, Any]:
    """Write one layer's records; ``parts`` maps piece names to ``[experts, ...]`` arrays.

    Returns the layer's index entry.
    """
    experts = {a.shape[0] for a in parts.values()}
    if len(experts) != 1:
        raise ValueError(f"{prefix}: pieces disagree on the number of experts: {experts}")
    count = experts.pop()
    entries: list[_Part] = []
    offset = 0
    for name, array in parts.items():
        nbytes = int(array[0].nbytes)
        entries.append(_Part(name, dtypes[name], tuple(array.shape[1:]), offset, nbytes))
        offset += nbytes
    record = -(-offset // ALIGNMENT) * ALIGNMENT
    block = np.zeros((count, record), dtype=np.uint8)
    for entry, array in zip(entries, parts.values(), strict=True):
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(count, -1)
        block[:, entry.offset : entry.offset + entry.nbytes] = raw
    name = layer_file_name(layer)
    (root / SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
    with open(root / SIDECAR_DIR / name, "wb") as f:
        f.write(block.tobytes())
    described = _description_crc(prefix, record, entries)
    return {
        "file": name,
        "num_experts": count,
        "record_bytes": record,
        "parts": [{**p._asdict(), "shape": list(p.shape)} for p in entries],
        "crc32": [zlib.crc32(row, described) for row in block],
    }


def write_index(root: Path, layers: Mapping[str, Mapping[str, Any]]) -> None:
    ordered = {k: layers[k] for k in sorted(layers, key=lambda k: layers[k]["file"])}
    index = {"format": FORMAT, "version": VERSION, "alignment": ALIGNMENT, "layers": ordered}
    path = root / SIDECAR_DIR / INDEX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)  # a model whose layers are all dense
    path.write_text(json.dumps(index, indent=1))


def read_sidecar(root: Path, switches: Mapping[str, SwitchSpec]) -> dict[str, LayerSource]:
    """Validate the sidecar index and layer files; one ``LayerSource`` per switch.

    Raises ``CorruptCheckpointError`` / ``MissingFileError`` naming the file for an unknown
    format or version, a layer file that is missing, truncated or named outside the sidecar
    folder, or parts that do not lay out their record back to back; tensor data is not read
    (each record's CRC-32, which also covers the index's description of it, is checked when the
    record is read).
    """
    folder = root / SIDECAR_DIR
    index_path = folder / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{index_path}: cannot be read ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{index_path}: not a mach expert sidecar index")
    if index.get("version") != VERSION:
        raise CorruptCheckpointError(
            f"{index_path}: sidecar version {index.get('version')!r}, this mach reads version "
            f"{VERSION}; re-run `mach convert` with this version of mach"
        )
    layers = index.get("layers")
    if not isinstance(layers, dict):
        raise CorruptCheckpointError(f"{index_path}: has no 'layers'")
    alignment = index.get("alignment")
    if not isinstance(alignment, int) or alignment <= 0:
        raise CorruptCheckpointError(
            f"{index_path}: alignment {alignment!r} is not a positive whole number; {_REBUILD}"
        )
    missing = [p for p in switches if p not in layers]
    if missing:
        raise CorruptCheckpointError(
            f"{index_path}: no entry for {missing[0]} ({len(missing)} MoE layer(s) absent); the "
            "sidecar does not belong to this config.json"
        )
    return {prefix: _layer_source(folder, prefix, spec, layers[prefix], alignment)
            for prefix, spec in switches.items()}  # fmt: skip


def _layer_source(
    folder: Path, prefix: str, spec: SwitchSpec, entry: Any, alignment: int
) -> LayerSource:
    where = folder / INDEX_FILE
    try:
        name = entry["file"]
        count, record = int(entry["num_experts"]), int(entry["record_bytes"])
        crcs = tuple(int(c) for c in entry["crc32"])
        parts = [_Part(str(p["name"]), str(p["dtype"]), tuple(int(d) for d in p["shape"]),
                       int(p["offset"]), int(p["nbytes"])) for p in entry["parts"]]  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed entry for {prefix} ({exc})") from exc
    path = member_path(folder, name, where)
    _check_layout(where, prefix, parts, record, alignment)
    if path.is_dir():
        raise MissingFileError(
            f"{path}: layer file for {prefix} is a folder; re-run `mach convert` or copy the "
            "whole expert_sidecar folder"
        )
    if not path.is_file():
        raise MissingFileError(
            f"{path}: layer file for {prefix} is missing; re-run `mach convert` or copy the "
            "whole expert_sidecar folder"
        )
    size = os.path.getsize(path)
    if size != count * record:
        raise CorruptCheckpointError(
            f"{path}: {size} bytes, but the index describes {count} records of {record} bytes; "
            "the file is truncated or does not belong to this index"
        )
    if len(crcs) != count:
        raise CorruptCheckpointError(f"{where}: {prefix} lists {len(crcs)} checksums for {count}")
    pieces = {p.name: Piece(p.name, p.dtype, p.shape, (path,) * count,
                            tuple(e * record + p.offset for e in range(count)))
              for p in parts}  # fmt: skip
    records = Record(path, record, tuple(e * record for e in range(count)), crcs,
                     _description_crc(prefix, record, parts))  # fmt: skip
    source = LayerSource(prefix, spec, pieces, records)
    source.check()
    return source


def _check_layout(
    where: Path, prefix: str, parts: list[_Part], record: int, alignment: int
) -> None:
    """The parts fill each record in order from byte 0, then padding up to the alignment."""
    end, seen = 0, set()
    for part in parts:
        label = f"part {part.name} of {prefix}"
        if part.name in seen:
            raise CorruptCheckpointError(f"{where}: {label} is listed twice; {_REBUILD}")
        seen.add(part.name)
        if part.dtype not in DTYPES:
            raise CorruptCheckpointError(
                f"{where}: {label} has dtype {part.dtype!r}, which a sidecar never holds; "
                f"{_REBUILD}"
            )
        itemsize = np.dtype(DTYPES[part.dtype][0]).itemsize
        if min(part.shape, default=0) < 0 or part.nbytes != math.prod(part.shape) * itemsize:
            raise CorruptCheckpointError(
                f"{where}: {label} does not fit its record: it is {part.nbytes} bytes, but "
                f"{part.dtype}{list(part.shape)} takes {math.prod(part.shape) * itemsize}; "
                f"{_REBUILD}"
            )
        if part.offset != end:
            raise CorruptCheckpointError(
                f"{where}: {label} starts at byte {part.offset} of its record, but the parts "
                f"before it end at byte {end}; parts follow each other from byte 0: {_REBUILD}"
            )
        end += part.nbytes
    padded = -(-end // alignment) * alignment
    if record != padded:
        raise CorruptCheckpointError(
            f"{where}: {prefix} has {record}-byte records, but its parts take {end} bytes, "
            f"{padded} once padded to the {alignment}-byte alignment; {_REBUILD}"
        )
