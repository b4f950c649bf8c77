"""A damaged sidecar is an error, never wrong output; read failures reach the caller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.errors import CorruptCheckpointError, MissingFileError
from mach.experts.reader import ExpertReadError
from mach.io.convert import convert

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"


@pytest.fixture
def sidecar(tmp_path: Path) -> Path:
    return convert(FAMILY / "mlx-q4", tmp_path / "model")


def layer_file(root: Path) -> Path:
    return sorted((root / "expert_sidecar").glob("layer_*.bin"))[0]


def index(root: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((root / "expert_sidecar" / "index.json").read_text())


def write_index(root: Path, data: dict) -> None:  # type: ignore[type-arg]
    (root / "expert_sidecar" / "index.json").write_text(json.dumps(data))


def generate(root: Path, **kwargs: object) -> list[int]:
    model, tokenizer, _, cache = load_moe(root, **kwargs)  # type: ignore[arg-type]
    engine = TargetEngine(model, tokenizer, cache.new)
    return engine.generate(list(range(3, 40)), SamplingParams(max_tokens=8)).tokens


@pytest.mark.parametrize("streaming", [True, False])
def test_flipped_byte_fails_its_checksum(sidecar: Path, streaming: bool) -> None:
    path = layer_file(sidecar)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExpertReadError, match=r"expert 0 of .* fails its checksum"):
        generate(sidecar, streaming=streaming)


def test_truncated_layer_file(sidecar: Path) -> None:
    path = layer_file(sidecar)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match=rf"{path.name}: .* truncated"):
        load_moe(sidecar, streaming=True)


def test_missing_layer_file(sidecar: Path) -> None:
    path = layer_file(sidecar)
    path.unlink()
    with pytest.raises(MissingFileError, match=rf"{path.name}: layer file .* is missing"):
        load_moe(sidecar, streaming=True)


def test_version_mismatch(sidecar: Path) -> None:
    data = index(sidecar)
    data["version"] = 99
    write_index(sidecar, data)
    with pytest.raises(CorruptCheckpointError, match="sidecar version 99"):
        load_moe(sidecar)


def test_index_missing_a_layer(sidecar: Path) -> None:
    data = index(sidecar)
    data["layers"].pop(next(iter(data["layers"])))
    write_index(sidecar, data)
    with pytest.raises(CorruptCheckpointError, match=r"does not belong to this config\.json"):
        load_moe(sidecar)


def test_index_shape_disagrees_with_config(sidecar: Path) -> None:
    data = index(sidecar)
    layer = next(iter(data["layers"].values()))
    layer["parts"][0]["shape"] = [32, 8]
    write_index(sidecar, data)
    with pytest.raises(CorruptCheckpointError, match="does not fit its record"):
        load_moe(sidecar)


def test_unreadable_index(sidecar: Path) -> None:
    (sidecar / "expert_sidecar" / "index.json").write_text("{")
    with pytest.raises(CorruptCheckpointError, match=r"index\.json: cannot be read"):
        load_moe(sidecar)


def test_file_truncated_mid_decode_surfaces_to_the_caller(sidecar: Path) -> None:
    model, tokenizer, _, cache = load_moe(sidecar, streaming=True)
    for path in (sidecar / "expert_sidecar").glob("layer_*.bin"):
        path.write_bytes(b"")
    engine = TargetEngine(model, tokenizer, cache.new)
    with pytest.raises(ExpertReadError, match="file ended at byte"):
        engine.generate(list(range(3, 40)), SamplingParams(max_tokens=8))
