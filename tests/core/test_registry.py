"""detect_arch (the one front door), unknown architectures and arch_summary."""

from __future__ import annotations

import pytest

from mach import REGISTRY, arch_summary, detect_arch, get_adapter
from mach.errors import UnknownArchitectureError


def test_detect_by_model_type() -> None:
    assert detect_arch({"model_type": "qwen3_moe"}).name == "qwen3_moe"


def test_detect_by_architectures_when_model_type_is_unfamiliar() -> None:
    config = {"model_type": "custom", "architectures": ["Qwen3MoeForCausalLM"]}
    assert detect_arch(config).name == "qwen3_moe"


def test_detect_inside_text_config() -> None:
    config = {"model_type": "wrapper", "text_config": {"model_type": "qwen3_moe"}}
    assert detect_arch(config).name == "qwen3_moe"


def test_explicit_arch_wins() -> None:
    assert detect_arch({"model_type": "qwen3_moe"}, arch="toy_moe").name == "toy_moe"


def test_unknown_family_of_ours_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from mach import registry

    monkeypatch.setitem(registry.KNOWN_FAMILIES, "futuremoe", "future")
    with pytest.raises(UnknownArchitectureError) as err:
        detect_arch({"model_type": "futuremoe"})
    message = str(err.value)
    assert "model_type 'futuremoe'" in message
    assert "qwen3_moe" in message and "toy_moe" in message
    assert "pip install mach-adapter-future" in message


def test_unknown_foreign_arch_points_to_adapters() -> None:
    with pytest.raises(UnknownArchitectureError) as err:
        detect_arch({"model_type": "llama"})
    assert "writing-an-adapter" in str(err.value)
    assert 'pip install "mach-moe[all]"' in str(err.value)


def test_config_without_any_key() -> None:
    with pytest.raises(UnknownArchitectureError, match="neither 'model_type' nor"):
        detect_arch({})


def test_get_adapter_unknown_key() -> None:
    with pytest.raises(UnknownArchitectureError, match="nosuch_moe"):
        get_adapter("nosuch_moe")


def test_arch_summary_fields() -> None:
    summary = arch_summary(REGISTRY["qwen3_moe"])
    assert summary["distribution"] == "mach-adapter-qwen"
    assert summary["version"]
    assert summary["kv_cache_kind"] == "standard"
    assert summary["continuous_batching"] is True
    assert "continuous_batching" not in summary["unavailable"]
    assert "continuous_batching+speculative_decoding" in summary["off_together"]
    assert summary["swiglu_variant"] == "swiglu"
    assert summary["has_expert_bias"] is False
    assert set(summary["layouts"]) == {"sliced", "stacked"}
    toy = arch_summary(REGISTRY["toy_moe"])
    assert toy["has_expert_bias"] is True and toy["swiglu_variant"] == "geglu"


def test_lazy_plugin_paths_fail_clearly() -> None:
    from mach.errors import AdapterError
    from mach.registry import load_object

    with pytest.raises(AdapterError, match=r"must look like 'package\.module:name'"):
        load_object("mach_adapter_deepseek.mtp.make_mtp_drafter", "drafter factory")
    with pytest.raises(AdapterError, match="does not resolve"):
        load_object("mach_adapter_deepseek.mtp:no_such_factory", "drafter factory")
    assert callable(load_object("mach_adapter_deepseek.mtp:make_mtp_drafter"))
