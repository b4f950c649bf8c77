"""The engine's expert format: ``expert_sidecar/layer_XX.bin`` plus a versioned ``index.json``.

Each layer file holds one fixed-size record per expert, in expert order. A record is every
piece of that expert (gate, up and down weights, their quantization scales and biases, expert
biases) back to back, padded to the index's alignment so records start on page boundaries. The
index names each piece's dtype, per-expert shape and offset inside the record, and a CRC-32 of
each record, so a corrupt or truncated file is caught instead of producing wrong output.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mach.errors import CorruptCheckpointError, MissingFileError
from mach.experts.sources import DTYPES, LayerSource, Piece, Record
from mach.experts.switch import SwitchSpec

SIDECAR_DIR = "expert_sidecar"
INDEX_FILE = "index.json"
FORMAT = "mach-expert-sidecar"
VERSION = 1
ALIGNMENT = 4096


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
    entries, offset = [], 0
    for name, array in parts.items():
        nbytes = array[0].nbytes
        entries.append({"name": name, "dtype": dtypes[name], "shape": list(array.shape[1:]),
                        "offset": offset, "nbytes": nbytes})  # fmt: skip
        offset += nbytes
    record = -(-offset // ALIGNMENT) * ALIGNMENT
    block = np.zeros((count, record), dtype=np.uint8)
    for entry, array in zip(entries, parts.values(), strict=True):
        start = entry["offset"]
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(count, -1)
        block[:, start : start + entry["nbytes"]] = raw
    name = layer_file_name(layer)
    (root / SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
    with open(root / SIDECAR_DIR / name, "wb") as f:
        f.write(block.tobytes())
    return {
        "file": name,
        "num_experts": count,
        "record_bytes": record,
        "parts": entries,
        "crc32": [zlib.crc32(row) for row in block],
    }


def write_index(root: Path, layers: Mapping[str, Mapping[str, Any]]) -> None:
    ordered = {k: layers[k] for k in sorted(layers, key=lambda k: layers[k]["file"])}
    index = {"format": FORMAT, "version": VERSION, "alignment": ALIGNMENT, "layers": ordered}
    path = root / SIDECAR_DIR / INDEX_FILE
    path.write_text(json.dumps(index, indent=1))


def read_sidecar(root: Path, switches: Mapping[str, SwitchSpec]) -> dict[str, LayerSource]:
    """Validate the sidecar index and layer files; one ``LayerSource`` per switch.

    Raises ``CorruptCheckpointError`` / ``MissingFileError`` naming the file for an unknown
    format or version, a missing or truncated layer file, or records that disagree with the
    index; tensor data is not read (each record's CRC-32 is checked when it is read).
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
    missing = [p for p in switches if p not in layers]
    if missing:
        raise CorruptCheckpointError(
            f"{index_path}: no entry for {missing[0]} ({len(missing)} MoE layer(s) absent); the "
            "sidecar does not belong to this config.json"
        )
    return {prefix: _layer_source(folder, prefix, spec, layers[prefix])
            for prefix, spec in switches.items()}  # fmt: skip


def _layer_source(folder: Path, prefix: str, spec: SwitchSpec, entry: Any) -> LayerSource:
    where = folder / INDEX_FILE
    try:
        path = folder / str(entry["file"])
        count, record = int(entry["num_experts"]), int(entry["record_bytes"])
        crcs = tuple(int(c) for c in entry["crc32"])
        parts = [(str(p["name"]), str(p["dtype"]), tuple(int(d) for d in p["shape"]),
                  int(p["offset"]), int(p["nbytes"])) for p in entry["parts"]]  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed entry for {prefix} ({exc})") from exc
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
    pieces: dict[str, Piece] = {}
    for name, dtype, shape, offset, nbytes in parts:
        piece = Piece(name, dtype, shape, (path,) * count,
                      tuple(e * record + offset for e in range(count)))  # fmt: skip
        if dtype not in DTYPES or piece.nbytes != nbytes or offset + nbytes > record:
            raise CorruptCheckpointError(
                f"{where}: piece {name} of {prefix} ({dtype}{list(shape)} at {offset}) does not "
                "fit its record"
            )
        pieces[name] = piece
    records = Record(path, record, tuple(e * record for e in range(count)), crcs)
    source = LayerSource(prefix, spec, pieces, records)
    source.check()
    return source
