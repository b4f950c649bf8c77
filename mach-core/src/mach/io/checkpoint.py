"""A checkpoint folder: its config, its tensor index (headers only) and its tokenizer files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mach.errors import CheckpointError, CorruptCheckpointError, MissingFileError
from mach.files import member_path
from mach.io.safetensors import read_header
from mach.tensors import TensorInfo

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """What is known about a checkpoint before any tensor data is read."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path] = field(default_factory=list)

    @property
    def tensor_names(self) -> frozenset[str]:
        return frozenset(self.tensors)

    @property
    def context_length(self) -> int | None:
        """``max_position_embeddings`` (also under ``text_config``), if the config gives one."""
        text = self.config.get("text_config")
        value = self.config.get("max_position_embeddings") or (
            text.get("max_position_embeddings") if isinstance(text, dict) else None
        )
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        )

    def read_json(self, name: str) -> dict[str, Any] | None:
        """An optional JSON file next to the weights, or ``None`` when absent."""
        return _read_json(self.path / name) if (self.path / name).is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object")
    return data


def _weight_files(root: Path) -> list[Path]:
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index_path}: has no 'weight_map'")
        shards = {member_path(root, s, index_path): s for s in weight_map.values()}
        folders = [s for path, s in shards.items() if path.is_dir()]
        if folders:
            raise MissingFileError(
                f"{root}: shard {folders[0]} listed in {INDEX_FILE} is a folder, not a "
                "safetensors file; fix the entry or replace the folder with the shard"
            )
        missing = sorted(s for path, s in shards.items() if not path.is_file())
        if missing:
            raise MissingFileError(
                f"{root}: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing; "
                "download every shard of the checkpoint"
            )
        return sorted(shards)
    files = sorted(root.glob("model*.safetensors")) or sorted(root.glob("*.safetensors"))
    if not files:
        raise MissingFileError(
            f"{root}: no *.safetensors weights found; mach reads safetensors checkpoints "
            "(convert .bin/.pt weights with transformers' save_pretrained first)"
        )
    return files


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``config.json`` and every safetensors header; never tensor data.

    Raises ``MissingFileError`` or ``CorruptCheckpointError`` naming the file at fault.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise MissingFileError(f"{root}: no such checkpoint folder")
    if not root.is_dir():
        raise CheckpointError(f"{root}: expected a checkpoint folder, got a file")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise MissingFileError(
            f"{root}: config.json is missing; a checkpoint folder needs config.json next to "
            "its *.safetensors files"
        )
    config = _read_json(config_path)
    files = _weight_files(root)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_header(file))
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = _read_json(index_path)["weight_map"]
        absent = [name for name, shard in weight_map.items() if name not in tensors]
        if absent:
            raise CorruptCheckpointError(
                f"{index_path}: lists {len(absent)} tensor(s) not found in their shards "
                f"(first: {absent[0]!r} in {weight_map[absent[0]]}); the download is incomplete"
            )
    return Checkpoint(root, config, tensors, files)
