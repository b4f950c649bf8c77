"""Each checkpoint fault gets the same named error from `mach check`, `mach generate` and
`mach serve`, before any tensor data is read, and never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mach.check import check_checkpoint
from mach.cli import _register_commands, app
from mach.io.convert import convert
from tests.checkpoint_edits import rewrite_header

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _config(root: Path, edit: Callable[[dict[str, object]], None]) -> None:
    config = json.loads((root / "config.json").read_text())
    edit(config)
    (root / "config.json").write_text(json.dumps(config))


def _tensors(root: Path, edit: Callable[[dict[str, mx.array]], None]) -> None:
    path = root / "model.safetensors"
    loaded = mx.load(str(path))
    assert isinstance(loaded, dict)
    weights = dict(loaded)
    edit(weights)
    mx.save_safetensors(str(path), weights)


def _overlap(header: dict[str, Any]) -> None:
    names = sorted((n for n in header if n != "__metadata__"),
                   key=lambda n: header[n]["data_offsets"][0])  # fmt: skip
    first, second = names[0], names[1]
    end = header[first]["data_offsets"][1]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    header[second]["data_offsets"] = [end - 4, end - 4 + size]


def _index(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = root / "model.safetensors.index.json"
    if not path.exists():
        path = root / "expert_sidecar" / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _outside(index: dict[str, Any]) -> None:
    weight_map = index["weight_map"]
    shard = sorted(set(weight_map.values()))[0]
    for tensor, name in weight_map.items():
        if name == shard:
            weight_map[tensor] = f"../{shard}"


def _shift_part(index: dict[str, Any]) -> None:
    layer = next(iter(index["layers"].values()))
    layer["parts"][1]["offset"] += 4


FAULTS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "config lacks a field": (
        "hf-per-expert",
        lambda r: _config(r, lambda c: c.pop("hidden_size")),
        "hidden_size",
    ),
    "config field has the wrong type": (
        "hf-per-expert",
        lambda r: _config(r, lambda c: c.update(num_experts="eight")),
        "num_experts",
    ),
    "tensor of the wrong shape": (
        "hf-per-expert",
        lambda r: _config(r, lambda c: c.update(moe_intermediate_size=32)),
        "switch_mlp.gate_proj",
    ),
    "num_experts disagrees with the tensors": (
        "hf-per-expert",
        lambda r: _config(r, lambda c: c.update(num_experts=4)),
        "[experts, out, in] = [8, 64, 64]",
    ),
    "a tensor is missing": (
        "hf-per-expert",
        lambda r: _tensors(r, lambda w: w.pop("model.norm.weight")),
        "1 tensor(s) missing (first: model.norm.weight)",
    ),
    "an extra tensor": (
        "hf-per-expert",
        lambda r: _tensors(r, lambda w: w.update({"model.extra.weight": mx.zeros((4,))})),
        "1 unexpected tensor(s) (first: model.extra.weight)",
    ),
    "overlapping data_offsets": (
        "hf-per-expert",
        lambda r: rewrite_header(r / "model.safetensors", _overlap),
        "overlap; the header is corrupt",
    ),
    "a weights path is a folder": (
        "hf-per-expert",
        lambda r: (r / "model-extra.safetensors").mkdir(),
        "model-extra.safetensors: is a folder, not a safetensors file",
    ),
    "a weight_map entry outside the folder": (
        "hf-sharded",
        lambda r: _index(r, _outside),
        "points outside",
    ),
    "a sidecar part offset disagrees with its record": (
        "sidecar",
        lambda r: _index(r, _shift_part),
        "parts before it end at byte",
    ),
}


@pytest.fixture(scope="module")
def cli() -> CliRunner:
    _register_commands()
    return CliRunner()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(FIXTURES / "qwen3_moe" / "mlx-q4", tmp_path_factory.mktemp("f") / "sidecar")


@pytest.fixture(params=list(FAULTS))
def faulty(request: pytest.FixtureRequest, tmp_path: Path, sidecar: Path) -> tuple[Path, str]:
    source, make, message = FAULTS[request.param]
    root = tmp_path / "ckpt"
    shutil.copytree(sidecar if source == "sidecar" else FIXTURES / "qwen3_moe" / source, root)
    make(root)
    return root, message


def _refused(cli: CliRunner, args: list[str], message: str) -> None:
    result = cli.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert message in result.output and "Traceback" not in result.output


def test_check_names_the_fault(faulty: tuple[Path, str]) -> None:
    root, message = faulty
    report = check_checkpoint(root)
    assert not report.loads and message in report.diagnosis


def test_generate_names_the_fault(cli: CliRunner, faulty: tuple[Path, str]) -> None:
    root, message = faulty
    _refused(cli, ["generate", str(root), "-n", "2"], message)


def test_serve_start_names_the_fault(cli: CliRunner, faulty: tuple[Path, str]) -> None:
    root, message = faulty
    _refused(cli, ["serve", str(root), "--port", "1"], message)


def test_check_cli_prints_each_path(cli: CliRunner, faulty: tuple[Path, str]) -> None:
    root, message = faulty
    result = cli.invoke(app, ["check", str(root), str(FIXTURES / "qwen3_moe" / "mlx-q4")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    rows = result.output.splitlines()
    bad = next(r for r in rows if r.startswith(str(root)))
    good = next(r for r in rows if r.startswith(str(FIXTURES / "qwen3_moe" / "mlx-q4")))
    assert "cannot load" in bad and message in bad
    assert "ok: loads resident" in good
