"""Headers and indexes that disagree with the files they describe fail by name, before any read."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mach import load_moe
from mach.errors import CorruptCheckpointError, MissingFileError
from mach.experts.reader import ExpertReadError
from mach.io.checkpoint import open_checkpoint
from mach.io.convert import convert
from tests.checkpoint_edits import Header, rewrite_header


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fixture = Path(__file__).parents[1] / "fixtures" / "qwen3_moe" / "mlx-q4"
    return convert(fixture, tmp_path_factory.mktemp("converted") / "model")


@pytest.fixture
def sidecar(tmp_path: Path, converted: Path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "sidecar"))


def by_offset(header: Header) -> list[str]:
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def edit_weight_map(root: Path, edit: Callable[[dict[str, str]], None]) -> None:
    path = root / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def rename_shard(weight_map: dict[str, str], old: str, new: str) -> None:
    for tensor, shard in weight_map.items():
        if shard == old:
            weight_map[tensor] = new


# safetensors data_offsets


def test_overlapping_tensors_name_both(checkpoint: Path) -> None:
    names: list[str] = []

    def overlap(header: Header) -> None:
        names.extend(by_offset(header)[2:4])
        first, second = (header[n] for n in names)
        size = second["data_offsets"][1] - second["data_offsets"][0]
        start = first["data_offsets"][0] + 4
        second["data_offsets"] = [start, start + size]

    rewrite_header(checkpoint / "model.safetensors", overlap)
    with pytest.raises(CorruptCheckpointError, match="overlap") as err:
        load_moe(checkpoint)
    assert "model.safetensors" in str(err.value)
    assert all(repr(n) in str(err.value) for n in names)


def test_offsets_that_run_backwards(checkpoint: Path) -> None:
    names: list[str] = []

    def reverse(header: Header) -> None:
        names.append(by_offset(header)[1])
        header[names[0]]["data_offsets"].reverse()

    rewrite_header(checkpoint / "model.safetensors", reverse)
    with pytest.raises(CorruptCheckpointError, match="do not form a byte range") as err:
        load_moe(checkpoint)
    assert repr(names[0]) in str(err.value)


@pytest.mark.parametrize(("dropped", "where"), [(0, "at the start of the data"), (1, "after")])
def test_gap_between_tensors(checkpoint: Path, dropped: int, where: str) -> None:
    names: list[str] = []

    def drop(header: Header) -> None:
        order = by_offset(header)
        names.extend([order[1]] if dropped == 0 else [order[0], order[2]])
        del header[order[dropped]]

    rewrite_header(checkpoint / "model.safetensors", drop)
    with pytest.raises(CorruptCheckpointError, match="belong to no tensor") as err:
        load_moe(checkpoint)
    assert where in str(err.value)
    assert all(repr(n) in str(err.value) for n in names)


def test_bytes_beyond_the_last_tensor(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="header does not match the file") as err:
        load_moe(checkpoint)
    assert "model.safetensors" in str(err.value)


# folders where weight files should be


def test_weights_path_is_a_folder(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.rename(checkpoint / "weights.bin")
    weights.mkdir()
    with pytest.raises(MissingFileError, match=r"model\.safetensors: is a folder"):
        load_moe(checkpoint)


def test_shard_is_a_folder(sharded: Path) -> None:
    shard = sharded / "model-00002-of-00004.safetensors"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(MissingFileError, match=rf"shard {shard.name} .* is a folder"):
        load_moe(sharded)


# weight_map entries naming files outside the checkpoint


@pytest.mark.parametrize("absolute", [False, True])
def test_shard_outside_the_folder(sharded: Path, absolute: bool) -> None:
    name = "model-00001-of-00004.safetensors"
    outside = sharded.parent / name
    (sharded / name).rename(outside)
    entry = str(outside) if absolute else f"../{name}"
    edit_weight_map(sharded, lambda m: rename_shard(m, name, entry))
    with pytest.raises(CorruptCheckpointError, match="points outside") as err:
        load_moe(sharded)
    assert "model.safetensors.index.json" in str(err.value) and repr(entry) in str(err.value)


def test_dot_dot_that_stays_inside_is_accepted(sharded: Path) -> None:
    name = "model-00001-of-00004.safetensors"
    (sharded / "sub").mkdir()
    edit_weight_map(sharded, lambda m: rename_shard(m, name, f"sub/../{name}"))
    assert sharded / name in open_checkpoint(sharded).files


def test_hub_cache_snapshot_of_symlinks_loads(sharded: Path, tmp_path: Path) -> None:
    blobs = tmp_path / "models--acme--tiny" / "blobs"
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(sharded.iterdir())):
        file.rename(blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    model, _, _, _ = load_moe(snapshot)
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)


# expert sidecar index


def sidecar_index(root: Path) -> dict[str, Any]:
    return json.loads((root / "expert_sidecar" / "index.json").read_text())  # type: ignore[no-any-return]


def write_sidecar_index(root: Path, index: dict[str, Any]) -> None:
    (root / "expert_sidecar" / "index.json").write_text(json.dumps(index, indent=1))


def first_layer(index: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    prefix = next(iter(index["layers"]))
    return prefix, index["layers"][prefix]


def test_edited_part_offset_fails_at_open(sidecar: Path) -> None:
    index = sidecar_index(sidecar)
    prefix, layer = first_layer(index)
    part = layer["parts"][1]
    part["offset"] += 4
    write_sidecar_index(sidecar, index)
    with pytest.raises(CorruptCheckpointError, match="parts before it end at byte") as err:
        load_moe(sidecar, streaming=True)
    assert f"part {part['name']} of {prefix}" in str(err.value)


def test_record_size_disagrees_with_parts(sidecar: Path) -> None:
    index = sidecar_index(sidecar)
    prefix, layer = first_layer(index)
    layer["record_bytes"] = 4096
    write_sidecar_index(sidecar, index)
    with pytest.raises(CorruptCheckpointError, match="once padded to the 4096-byte") as err:
        load_moe(sidecar, streaming=True)
    assert prefix in str(err.value)


@pytest.mark.parametrize("entry", ["../model.safetensors", "/etc/passwd"])
def test_layer_file_outside_the_sidecar(sidecar: Path, entry: str) -> None:
    index = sidecar_index(sidecar)
    _, layer = first_layer(index)
    layer["file"] = entry
    write_sidecar_index(sidecar, index)
    with pytest.raises(CorruptCheckpointError, match="points outside") as err:
        load_moe(sidecar, streaming=True)
    assert "index.json" in str(err.value) and repr(entry) in str(err.value)


def test_layer_file_is_a_folder(sidecar: Path) -> None:
    _, layer = first_layer(sidecar_index(sidecar))
    path = sidecar / "expert_sidecar" / layer["file"]
    path.unlink()
    path.mkdir()
    with pytest.raises(MissingFileError, match=rf"{path.name}: layer file .* is a folder"):
        load_moe(sidecar, streaming=True)


def test_version_1_asks_for_a_new_convert(sidecar: Path) -> None:
    index = sidecar_index(sidecar)
    index["version"] = 1
    write_sidecar_index(sidecar, index)
    with pytest.raises(CorruptCheckpointError, match=r"version 1, .* re-run `mach convert`"):
        load_moe(sidecar)


def swap_names(parts: list[dict[str, Any]]) -> None:
    parts[0]["name"], parts[3]["name"] = parts[3]["name"], parts[0]["name"]


def transpose_scales(parts: list[dict[str, Any]]) -> None:
    parts[1]["shape"].reverse()


def retype_scales(parts: list[dict[str, Any]]) -> None:
    parts[1]["dtype"] = "U32"


def drop_last_part(parts: list[dict[str, Any]]) -> None:
    parts.pop()  # its bytes now read as padding, which the record size still allows


@pytest.mark.parametrize("edit", [swap_names, transpose_scales, retype_scales, drop_last_part])
@pytest.mark.parametrize("streaming", [False, True])
def test_edited_part_description_fails_its_checksum(
    sidecar: Path, edit: Callable[[list[dict[str, Any]]], None], streaming: bool
) -> None:
    index = sidecar_index(sidecar)
    prefix, layer = first_layer(index)
    edit(layer["parts"])
    write_sidecar_index(sidecar, index)
    pattern = rf"layer_00\.bin: expert \d+ of {re.escape(prefix)} fails its checksum"
    with pytest.raises(ExpertReadError, match=pattern):
        model, _, _, _ = load_moe(sidecar, streaming=streaming)
        mx.eval(model(mx.array([list(range(3, 40))])))
