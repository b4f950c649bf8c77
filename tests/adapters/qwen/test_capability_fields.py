"""The adapter's capability fields are what runs: the loader acts on each, or refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import REGISTRY, load_moe
from mach.check import check_checkpoint
from mach.errors import AdapterError, CheckpointError, ShapeMismatchError
from mach.experts.activations import GateActivation
from mach.experts.swap import bind_switches
from mach.io.options import LoadOptions
from mach_adapter_qwen.adapters import Qwen3MoeAdapter

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"


@pytest.fixture
def variant() -> Iterator[type[Qwen3MoeAdapter]]:
    """A qwen3_moe adapter under its own key, whose fields a test then changes."""

    class Variant(Qwen3MoeAdapter):
        name = "qwen3_moe_variant"
        model_types = ()

    REGISTRY.register(Variant)
    yield Variant
    REGISTRY.unregister(Variant.name)


def _logits(path: Path, arch: str) -> np.ndarray:
    model, _, _, _ = load_moe(path, arch=arch, dtype="float32")
    ids = np.load(path / "reference.npz")["input_ids"]
    return np.array(model(mx.array(ids)))


def test_swiglu_variant_is_the_activation_that_runs(variant: type[Qwen3MoeAdapter]) -> None:
    path = FAMILY / "hf-per-expert"
    reference = np.load(path / "reference.npz")["logits"]
    assert np.abs(_logits(path, variant.name) - reference).max() < 1e-4
    variant.swiglu_variant = "geglu"
    switch = load_moe(path, arch=variant.name).model.layers[0].mlp.switch_mlp
    assert switch.spec.activation == GateActivation("geglu")
    assert np.abs(_logits(path, variant.name) - reference).max() > 1e-2


def test_a_model_that_disagrees_with_its_adapter_is_refused() -> None:
    toy = REGISTRY["toy_moe"]
    config = {"model_type": "toy_moe", "dim": 32, "heads": 4, "layers": 1, "experts": 4,
              "expert_dim": 16, "top_k": 2, "vocab": 64}  # fmt: skip
    with pytest.raises(AdapterError, match="declares GateActivation"):
        bind_switches(toy.build_model(config), GateActivation("swiglu"), True, "toy_moe")
    with pytest.raises(AdapterError, match="has_expert_bias=False"):
        bind_switches(toy.build_model(config), GateActivation("geglu"), False, "toy_moe")


@pytest.mark.parametrize("options", [LoadOptions(streaming=False), LoadOptions(streaming=True)])
def test_expert_bias_must_match_has_expert_bias(
    variant: type[Qwen3MoeAdapter], options: LoadOptions
) -> None:
    variant.has_expert_bias = True
    with pytest.raises(ShapeMismatchError, match="have no bias tensors"):
        load_moe(FAMILY / "mlx-q4", options=options.with_defaults(arch=variant.name))


def test_routed_format_must_be_listed(variant: type[Qwen3MoeAdapter]) -> None:
    variant.routed_quantization = ("float",)
    with pytest.raises(CheckpointError, match="routed experts are affine4"):
        load_moe(FAMILY / "mlx-q4", arch=variant.name)
    report = check_checkpoint(FAMILY / "mlx-q4", LoadOptions(arch=variant.name))
    assert not report.loads and "routed experts are affine4" in report.diagnosis
    load_moe(FAMILY / "hf-per-expert", arch=variant.name)


def test_expert_store_must_be_listed(variant: type[Qwen3MoeAdapter]) -> None:
    variant.expert_stores = ("resident",)
    with pytest.raises(AdapterError, match="supports the expert stores resident, not streaming"):
        load_moe(FAMILY / "mlx-q4", arch=variant.name, streaming=True)
    report = check_checkpoint(FAMILY / "mlx-q4", LoadOptions(arch=variant.name))
    assert report.loads and not report.residency["streaming"]["available"]


def test_cache_kinds_must_be_declared(variant: type[Qwen3MoeAdapter]) -> None:
    variant.cache_backends = ("gdn",)
    with pytest.raises(AdapterError, match="make_cache returns kv caches"):
        load_moe(FAMILY / "mlx-q4", arch=variant.name)


def test_layout_must_be_listed(variant: type[Qwen3MoeAdapter]) -> None:
    from mach.adapter import ExpertLayout

    variant.layouts = (ExpertLayout.SLICED,)
    with pytest.raises(CheckpointError, match="this checkpoint's experts are stacked"):
        load_moe(FAMILY / "mlx-q4", arch=variant.name)


def test_features_mach_lacks_are_false_everywhere() -> None:
    from mach.capabilities import UNAVAILABLE
    from mach.registry import arch_summary

    for name in REGISTRY:
        summary = arch_summary(REGISTRY[name])
        for feature in UNAVAILABLE:
            if feature in summary:
                assert summary[feature] is False, (name, feature)
        assert summary["unavailable"] == UNAVAILABLE
    report = check_checkpoint(FAMILY / "mlx-q4")
    assert report.continuous_batching is True and report.prefix_reuse is True
    assert report.sequential_reason is None


def test_every_cache_kind_reuses_prefixes() -> None:
    from mach.registry import arch_summary

    for name in ("qwen3_moe", "qwen3_5_moe"):
        summary = arch_summary(REGISTRY[name])
        assert summary["prefix_reuse"] is True and "prefix_reuse" not in summary["unavailable"]
