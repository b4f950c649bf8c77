"""mach-adapter-qwen is installed and its entry point registers its architectures."""

from __future__ import annotations

from mach import REGISTRY, plugins


def test_entry_point_registers_qwen3_moe() -> None:
    assert "qwen3_moe" in REGISTRY
    record = plugins.plugin_record("qwen")
    assert record is not None and record.distribution == "mach-adapter-qwen"
    assert type(REGISTRY["qwen3_moe"]).__module__ == "mach_adapter_qwen.adapters"
