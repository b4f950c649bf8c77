"""Streaming experts give the same logits and tokens as resident runs, within a bounded memory."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.errors import CheckpointError, MachError
from mach.experts.bank import BudgetError
from mach.io.convert import convert
from mach.io.residency import StackedStreamingWarning

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"


@pytest.fixture(scope="module")
def sidecars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sidecar")
    return {
        "sidecar-float": convert(FAMILY / "hf-per-expert", root / "float"),
        "sidecar-q4": convert(FAMILY / "mlx-q4", root / "q4"),
    }


SOURCES = {
    "stacked-q4": ("mlx-q4", "mlx-q4"),
    "stacked-float": ("mlx-stacked", "mlx-stacked"),
    "per-expert": ("hf-per-expert", "hf-per-expert"),
    "sidecar-float": (None, "hf-per-expert"),
    "sidecar-q4": (None, "mlx-q4"),
}


def source_path(name: str, sidecars: dict[str, Path]) -> Path:
    folder = SOURCES[name][0]
    return FAMILY / folder if folder else sidecars[name]


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FAMILY / SOURCES[name][1] / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def quiet_load(path: Path, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackedStreamingWarning)
        return load_moe(path, **kwargs)


def min_budget(path: Path) -> int:
    _, _, store, _ = quiet_load(path, streaming=True, expert_budget="1GB")
    return int(store.stats()["bytes_per_slot"]) * 2  # top-2 routing


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("slots", [2, 3, 5, None])
@pytest.mark.parametrize("gather", [True, False])
def test_streaming_matches_the_reference(
    source: str, slots: int | None, gather: bool, sidecars: dict[str, Path]
) -> None:
    path = source_path(source, sidecars)
    ref = reference(source)
    if slots is None:
        kwargs: dict[str, Any] = {"streaming": False}
    else:
        kwargs = {"expert_budget": min_budget(path) // 2 * slots}
    model, _, store, cache = quiet_load(path, gather_dispatch=gather, **kwargs)
    if slots is not None:
        assert store.stats()["slots_per_layer"] == slots
    logits = np.array(model(mx.array(ref["input_ids"])))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    engine = TargetEngine(model, None, cache.new, prefill_step_size=5)
    params = SamplingParams(max_tokens=ref["greedy"].shape[1])
    assert engine.generate(ref["input_ids"][0].tolist(), params).tokens == ref["greedy"][0].tolist()


@pytest.mark.parametrize("prefill", ["transient", "resident"])
def test_prefill_modes_agree(prefill: str, sidecars: dict[str, Path]) -> None:
    path = sidecars["sidecar-q4"]
    ref = reference("sidecar-q4")
    # Room for all 8 experts, so resident prefill never needs the transient fallback.
    model, _, store, cache = load_moe(path, expert_budget=min_budget(path) * 4, prefill=prefill)
    engine = TargetEngine(model, None, cache.new)
    params = SamplingParams(max_tokens=ref["greedy"].shape[1])
    assert engine.generate(ref["input_ids"][0].tolist(), params).tokens == ref["greedy"][0].tolist()
    stats = store.stats()
    assert stats["misses"] > 0 and stats["bytes_read"] > 0
    assert (stats["transient_calls"] > 0) == (prefill == "transient")
    # Prefill and decode are counted apart, and together they are every lookup and read.
    phases = stats["prefill"], stats["decode"]
    assert sum(p["bytes_read"] for p in phases) == stats["bytes_read"]
    assert sum(p["hits"] for p in phases) == stats["hits"]
    assert sum(p["misses"] for p in phases) == stats["misses"]
    assert all(p["hits"] + p["misses"] > 0 for p in phases)


def test_stacked_streaming_prints_the_guard() -> None:
    with pytest.warns(StackedStreamingWarning, match="per-expert|own slice"):
        load_moe(FAMILY / "mlx-q4", streaming=True)


def test_fused_checkpoint_asks_for_a_conversion() -> None:
    with pytest.raises(CheckpointError, match="mach convert"):
        load_moe(FAMILY / "hf-fused", streaming=True)


def test_budget_below_top_k_names_the_minimum(sidecars: dict[str, Path]) -> None:
    path = sidecars["sidecar-q4"]
    need = min_budget(path)
    with pytest.raises(BudgetError, match=f"at least {need:,} bytes"):
        load_moe(path, expert_budget=need - 1)


@pytest.mark.parametrize("budget", ["lots", "-1GB", "0"])
def test_bad_budget_strings(budget: str, sidecars: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="budget"):
        load_moe(sidecars["sidecar-q4"], expert_budget=budget)


def test_budget_without_streaming_is_contradictory(sidecars: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="only to streaming"):
        load_moe(sidecars["sidecar-q4"], streaming=False, expert_budget="1MB")


def test_resident_sidecar_and_source_are_the_same_model(sidecars: dict[str, Path]) -> None:
    ref = reference("sidecar-float")
    ids = mx.array(ref["input_ids"])
    a = np.array(load_moe(sidecars["sidecar-float"], streaming=False)[0](ids))
    b = np.array(load_moe(FAMILY / "hf-per-expert")[0](ids))
    np.testing.assert_array_equal(a, b)


def test_convert_quantizes_like_mlx_lm(tmp_path: Path) -> None:
    out = convert(FAMILY / "hf-per-expert", tmp_path / "q4", bits=4)
    ref = reference("stacked-q4")
    model, tokenizer, _, _ = load_moe(out)
    assert tokenizer is not None
    logits = np.array(model(mx.array(ref["input_ids"])))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    assert type(model.layers[0].mlp.gate).__name__ == "QuantizedLinear"
    assert model.layers[0].mlp.gate.bits == 8


def test_convert_refuses_an_existing_target(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert(FAMILY / "hf-per-expert", tmp_path / "taken")


def test_failed_convert_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "broken"
    shutil.copytree(FAMILY / "hf-sharded", source)
    sorted(source.glob("model-*.safetensors"))[-1].write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    with pytest.raises(CheckpointError):
        convert(source, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_streaming_embedding_reads_rows_on_demand() -> None:
    ref = reference("per-expert")
    model, _, _, _ = load_moe(FAMILY / "hf-per-expert", streaming_embedding=True)
    embed = model.model.embed_tokens
    assert type(embed).__name__ == "StreamingEmbedding"
    logits = np.array(model(mx.array(ref["input_ids"])))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    assert embed.rows_read == len(np.unique(ref["input_ids"]))


@pytest.mark.parametrize(("layout", "message"), [("hf-tied", "tied"), ("mlx-q4", "plain float")])
def test_streaming_embedding_refuses_what_it_cannot_stream(layout: str, message: str) -> None:
    with pytest.raises(MachError, match=message):
        load_moe(FAMILY / layout, streaming_embedding=True)


def test_environment_switch_selects_the_legacy_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LME_USE_GATHER_DISPATCH", "0")
    model, _, _, _ = load_moe(FAMILY / "mlx-q4")
    switch = model.layers[0].mlp.switch_mlp
    assert type(switch).__name__ == "DiskSwitchGLU"
    ref = reference("stacked-q4")
    assert np.abs(np.array(model(mx.array(ref["input_ids"]))) - ref["logits"]).max() <= 1e-4
    assert switch.stats()["expert_runs"] > 0


def test_convert_names_experts_a_group_size_cannot_split(tmp_path: Path) -> None:
    # This model's experts have an intermediate size of 16: no MLX group size divides it.
    source = FAMILY.parent / "sweep" / "qwen3_5_moe" / "all-full-attention"
    with pytest.raises(ValueError, match=r"layers\.\d+\.mlp\.switch_mlp.*intermediate size 16.*"
                                         r"convert without --bits"):  # fmt: skip
        convert(source, tmp_path / "q4", bits=4, group_size=32)
    assert list(tmp_path.iterdir()) == []


def test_convert_suggests_a_group_size_that_divides(tmp_path: Path) -> None:
    expected = "input size 64 is not a multiple of the group size 128, so they cannot be quantized"
    with pytest.raises(ValueError, match=f"{expected}; use --group-size 64"):
        convert(FAMILY / "hf-per-expert", tmp_path / "q4", bits=4, group_size=128)


def test_convert_refuses_a_format_the_family_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mach_adapter_qwen.adapters import Qwen3MoeAdapter

    monkeypatch.setattr(Qwen3MoeAdapter, "routed_quantization", ("float",))
    with pytest.raises(ValueError, match="qwen3_moe does not run 8-bit affine experts"):
        convert(FAMILY / "hf-per-expert", tmp_path / "q8", bits=8)
    assert list(tmp_path.iterdir()) == []
