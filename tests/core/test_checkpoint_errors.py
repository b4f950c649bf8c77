"""Bad checkpoints fail before tensor data is read, naming the file and the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mach import load_moe
from mach.errors import (
    CorruptCheckpointError,
    MissingFileError,
    ShapeMismatchError,
    UnknownArchitectureError,
)


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="no such checkpoint folder"):
        load_moe(tmp_path / "nope")


def test_missing_config(checkpoint: Path) -> None:
    (checkpoint / "config.json").unlink()
    with pytest.raises(MissingFileError, match=r"config\.json is missing"):
        load_moe(checkpoint)


def test_config_not_json(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"config\.json: not valid JSON"):
        load_moe(checkpoint)


def test_no_weights(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"no \*\.safetensors weights"):
        load_moe(checkpoint)


def test_unknown_model_type(checkpoint: Path) -> None:
    _edit_config(checkpoint, model_type="mystery_moe", architectures=["MysteryForCausalLM"])
    with pytest.raises(UnknownArchitectureError) as err:
        load_moe(checkpoint)
    assert "mystery_moe" in str(err.value) and "qwen3_moe" in str(err.value)


def test_truncated_safetensors(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptCheckpointError) as err:
        load_moe(checkpoint)
    assert "model.safetensors" in str(err.value) and "truncated" in str(err.value)


def test_garbage_header(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"this is not json" + b"0" * 64)
    with pytest.raises(
        CorruptCheckpointError, match=r"model\.safetensors: header is not valid JSON"
    ):
        load_moe(checkpoint)


def test_header_length_beyond_file(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length"):
        load_moe(checkpoint)


def test_missing_shard(sharded: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingFileError) as err:
        load_moe(sharded)
    assert shard.name in str(err.value) and "model.safetensors.index.json" in str(err.value)


def test_index_lists_absent_tensor(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.gate.weight"] = "model-00001-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"model\.layers\.9\.mlp\.gate\.weight"):
        load_moe(sharded)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"vocab_size": 1000}, r"(lm_head|embed_tokens)\.weight in model\.safetensors has shape"),
        ({"num_experts": 4}, r"\[experts, out, in\] = \[8, 64, 64\].*\[4, 64, 64\]"),
        ({"moe_intermediate_size": 32}, r"switch_mlp\.gate_proj"),
        (
            {"num_hidden_layers": 4},
            r"model\.layers\.3\.mlp\.switch_mlp\.gate_proj\.weight is missing",
        ),
    ],
)
def test_shape_mismatch_is_caught_before_reading(
    checkpoint: Path, change: dict[str, int], expected: str
) -> None:
    _edit_config(checkpoint, **change)
    with pytest.raises(ShapeMismatchError, match=expected):
        load_moe(checkpoint)
    # Nothing of the 1.3 MB of weights is read into memory: measured in a process of its own,
    # since MLX's peak counter is shared by everything running in this one.
    probe = (
        "import mlx.core as mx, sys\n"
        "from mach import load_moe\n"
        "try:\n    load_moe(sys.argv[1])\nexcept Exception:\n    pass\n"
        "print(mx.get_peak_memory())"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(checkpoint)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert int(result.stdout.strip().splitlines()[-1]) < 200_000, result.stderr


def test_checkpoint_without_tokenizer_still_loads(checkpoint: Path) -> None:
    (checkpoint / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match=r"no tokenizer\.json"):
        model, tokenizer, _, _ = load_moe(checkpoint)
    assert tokenizer is None
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)


def test_hub_id_resolves_from_the_local_cache(
    tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "0123abcd"
    shutil.copytree(fixtures_dir / "qwen3_moe" / "mlx-q4", snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tokenizer, _, _ = load_moe("acme/tiny-moe")
    assert tokenizer is not None and model(mx.array([[1, 2]])).shape == (1, 2, 512)
    with pytest.raises(MissingFileError, match="mach download acme/not-downloaded"):
        load_moe("acme/not-downloaded")
