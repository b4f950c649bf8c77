"""mach check predicts from headers what loading then does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mach import load_moe
from mach.check import check_checkpoint
from mach.default_model import default_model_path
from mach.io.convert import convert
from mach.io.residency import StackedStreamingWarning

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"
LAYOUTS = ["hf-per-expert", "hf-fused", "hf-sharded", "hf-tied", "mlx-stacked", "mlx-q4", "mlx-q8"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    found = {name: FAMILY / name for name in LAYOUTS}
    found["sidecar"] = convert(FAMILY / "mlx-q4", tmp_path_factory.mktemp("check") / "sidecar")
    found["default"] = default_model_path()
    return found


@pytest.mark.parametrize("name", [*LAYOUTS, "sidecar", "default"])
def test_prediction_matches_loading(name: str, checkpoints: dict[str, Path]) -> None:
    path = checkpoints[name]
    report = check_checkpoint(path)
    assert report.loads and report.diagnosis == "ok" and report.arch == "qwen3_moe"
    _, tokenizer, store, _ = load_moe(path, streaming=False)
    assert report.tokenizer == (tokenizer is not None)
    assert report.moe_layers == store.stats()["layers"]
    layer = store.layer(next(iter(store.layers)))
    matrix = layer.weights.gate_up or layer.weights.gate
    expected_quant = f"affine{matrix.bits}" if matrix.bits else None
    if expected_quant:
        assert report.routed_quantization == expected_quant
        assert report.expert_bytes == store.nbytes
    elif report.routed_quantization == "float32":
        assert report.expert_bytes == store.nbytes
    streaming = report.residency["streaming"]["available"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackedStreamingWarning)
        try:
            load_moe(path, expert_budget=report.residency.get("streaming", {}).get(
                "minimum_budget_bytes", 10**9))  # fmt: skip
            streamed = True
        except Exception:
            streamed = False
    assert streamed == streaming
    expected_layout = {"sidecar": "sidecar", "hf-per-expert": "sliced", "hf-sharded": "sliced",
                       "hf-tied": "sliced"}.get(name, "stacked")  # fmt: skip
    assert report.layout == expected_layout


def test_missing_shard_is_diagnosed(tmp_path: Path) -> None:
    target = tmp_path / "s"
    shutil.copytree(FAMILY / "hf-sharded", target)
    sorted(target.glob("model-*.safetensors"))[0].unlink()
    report = check_checkpoint(target)
    assert not report.loads and "are missing" in report.diagnosis


def test_truncated_header_is_diagnosed(tmp_path: Path) -> None:
    target = tmp_path / "t"
    shutil.copytree(FAMILY / "mlx-q4", target)
    (target / "model.safetensors").write_bytes(b"\x00" * 4)
    report = check_checkpoint(target)
    assert not report.loads and "too short to be a safetensors file" in report.diagnosis


def test_unknown_model_type_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family mach publishes but that is not installed here names its extra."""
    from mach import registry

    monkeypatch.setitem(registry.KNOWN_FAMILIES, "futuremoe", "future")
    target = tmp_path / "u"
    shutil.copytree(FAMILY / "mlx-q4", target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="futuremoe", architectures=[])
    (target / "config.json").write_text(json.dumps(config))
    report = check_checkpoint(target)
    assert not report.loads and "pip install mach-adapter-future" in report.diagnosis


def test_missing_tokenizer_loads_but_cannot_serve(tmp_path: Path) -> None:
    target = tmp_path / "n"
    shutil.copytree(FAMILY / "mlx-q4", target)
    (target / "tokenizer.json").unlink()
    report = check_checkpoint(target)
    assert report.loads and not report.tokenizer
    assert report.serving == {"completions": False, "chat_completions": False, "tools": False,
                              "structured_output": False}  # fmt: skip
    assert any("tokenizer.json" in w for w in report.warnings)


def test_cli_table_json_and_exit_code(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    def mach(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mach", "check", *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    good = mach(str(checkpoints["mlx-q4"]), str(checkpoints["sidecar"]))
    assert good.returncode == 0 and "affine4" in good.stdout and "sidecar" in good.stdout
    mixed = mach(str(checkpoints["mlx-q4"]), str(tmp_path / "missing"), "--json")
    assert mixed.returncode == 1
    reports = json.loads(mixed.stdout)["checkpoints"]
    assert [r["loads"] for r in reports] == [True, False]
    assert reports[0]["arch_summary"]["name"] == "qwen3_moe"
