"""One load path: ``mach check`` predicts exactly what ``load_moe`` does, for every fixture."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from mach import load_moe
from mach.check import check_checkpoint
from mach.default_model import default_model_path
from mach.errors import MachError, OptionsError
from mach.io.convert import convert
from mach.io.load import LoadedModel
from mach.io.options import LoadOptions
from mach.io.residency import StackedStreamingWarning

FIXTURES = Path(__file__).parents[1] / "fixtures"
CHECKPOINTS = sorted(p.parent.relative_to(FIXTURES).as_posix()
                     for p in FIXTURES.glob("*/*/config.json"))  # fmt: skip
OPTIONS = {
    "default": LoadOptions(),
    "resident": LoadOptions(streaming=False),
    "streaming": LoadOptions(streaming=True),
    "budget": LoadOptions(expert_budget="200KB"),
    "bf16": LoadOptions(expert_residency="bf16_streaming"),
}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(FIXTURES / "qwen3_moe" / "mlx-q4", tmp_path_factory.mktemp("lp") / "sidecar")


def _path(name: str, sidecar: Path) -> Path:
    if name == "default":
        return default_model_path()
    return sidecar if name == "sidecar" else FIXTURES / name


def _param_bytes(loaded: LoadedModel) -> int:
    return sum(int(v.nbytes) for _, v in tree_flatten(loaded.model.parameters()))


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", [*CHECKPOINTS, "sidecar", "default"])
def test_check_equals_load(name: str, option: str, sidecar: Path) -> None:
    path, options = _path(name, sidecar), OPTIONS[option]
    report = check_checkpoint(path, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackedStreamingWarning)
        if not report.loads:
            with pytest.raises(MachError) as failure:
                load_moe(path, options=options)
            assert str(failure.value) == report.diagnosis
            return
        loaded = load_moe(path, options=options)
    store, figures = loaded.store, report.store
    assert figures["residency"] == store.kind == loaded.experts.residency
    assert figures["expert_memory_bytes"] == store.nbytes
    assert figures["memory_bytes"] == store.nbytes + _param_bytes(loaded)
    assert report.non_expert_bytes == _param_bytes(loaded)
    assert report.moe_layers == len(loaded.plan.switches) == store.stats()["layers"]
    if loaded.experts.streaming:
        stats = store.stats()
        assert figures["budget_bytes"] == stats["budget_bytes"]
        assert figures["slots_per_layer"] == stats["slots_per_layer"]
        assert figures["minimum_budget_bytes"] == stats["bytes_per_slot"] * report.top_k
        assert report.expert_bytes == stats["expert_bytes_on_disk"]
    chosen = report.residency[store.kind]
    assert {k: chosen[k] for k in figures} == figures
    assert report.arch == loaded.adapter.name and report.layout == loaded.experts.layout
    assert report.tokenizer == (loaded.tokenizer is not None)


def test_default_model_budget_is_the_one_loading_picks() -> None:
    report = check_checkpoint(default_model_path(), LoadOptions(streaming=True))
    loaded = load_moe(default_model_path(), streaming=True)
    assert report.store["budget_bytes"] == loaded.store.stats()["budget_bytes"]
    assert report.residency["streaming"]["budget_bytes"] == loaded.store.stats()["budget_bytes"]


def test_loaded_model_unpacks_and_carries_the_plan() -> None:
    loaded = load_moe(FIXTURES / "qwen3_moe" / "mlx-q4")
    model, tokenizer, store, cache = loaded
    assert tokenizer is loaded.tokenizer and cache is loaded.cache
    assert loaded[0] is model and loaded[2] is store and len(loaded) == 4
    assert loaded.adapter.name == "qwen3_moe"
    assert loaded.checkpoint.path == FIXTURES / "qwen3_moe" / "mlx-q4"
    assert loaded.options == LoadOptions()
    assert loaded.experts.quantization == "affine4" and loaded.experts.layout == "stacked"
    assert loaded.summary["name"] == "qwen3_moe"
    assert loaded.plan.weights == {}, "the plan lets go of the weights once they are loaded"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefill": "bogus"}, "prefill must be one of transient, resident, got 'bogus'"),
        ({"dtype": "f32"}, "dtype must be one of float32, float16, bfloat16"),
        ({"streaming": "yes"}, "streaming must be True or False"),
        ({"expert_budget": "lots"}, "expert budget 'lots' is not a size"),
        ({"expert_budget": 0}, "expert budget must be at least one byte"),
        ({"expert_budget": True}, "expert budget must be bytes or a size string"),
        ({"expert_residency": "ssd"}, "expert_residency must be one of resident, streaming"),
        ({"streaming": False, "expert_budget": "1GB"}, "applies only to streaming"),
        ({"streaming": False, "expert_residency": "streaming"}, "contradicts"),
        ({"verify_experts": 1}, "verify_experts must be True or False"),
        ({"prewarm": "yes"}, "prewarm must be True or False"),
        ({"compile": "no"}, "compile must be True or False"),
        ({"arch": ""}, "arch must be an architecture key"),
        ({"prefil": "resident"}, "unknown load option(s) prefil"),
    ],
)
def test_bad_options_are_refused_before_anything_is_read(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(OptionsError) as failure:
        load_moe("/nonexistent/checkpoint", **options)
    assert message in str(failure.value)


def test_options_are_frozen_and_budgets_parsed() -> None:
    options = LoadOptions(expert_budget="1.5KB")
    assert options.expert_budget == 1500
    with pytest.raises(AttributeError):
        options.prefill = "resident"  # type: ignore[misc]
    assert options.with_defaults(dtype="float32").dtype == "float32"
    assert LoadOptions(dtype="float16").with_defaults(dtype="float32").dtype == "float16"


def test_options_and_keywords_do_not_mix() -> None:
    with pytest.raises(OptionsError, match="not both"):
        load_moe(FIXTURES / "qwen3_moe" / "mlx-q4", options=LoadOptions(), streaming=True)
