"""The plugin seam: entry points, the allow-list, broken plugins, strict mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mach import REGISTRY, MoeArchAdapter, hookimpl, plugins


def run_archs(
    env_extra: dict[str, str], tmp_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACH_")}
    env.update(env_extra)
    if tmp_path is not None:
        env["PYTHONPATH"] = str(tmp_path)
    code = "import sys; sys.argv=['mach','archs','--json']; from mach.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_installed_entry_points_are_found() -> None:
    assert "qwen3_moe" in REGISTRY
    assert "toy_moe" in REGISTRY
    assert plugins.plugin_record("qwen").distribution == "mach-adapter-qwen"
    assert plugins.plugin_record("toymoe").distribution == "mach-adapter-toymoe"


def test_allow_list_limits_plugins() -> None:
    only_toy = run_archs({"MACH_LOAD_PLUGINS": "mach-adapter-toymoe"})
    assert only_toy.returncode == 0, only_toy.stderr
    assert [a["name"] for a in json.loads(only_toy.stdout)["archs"]] == ["toy_moe"]
    none = run_archs({"MACH_LOAD_PLUGINS": ""})
    assert json.loads(none.stdout)["archs"] == []


def _broken_distribution(root: Path) -> None:
    dist = root / "mach_broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mach-broken-plugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text("[mach.adapters]\nbroken = mach_broken_plugin\n")
    (root / "mach_broken_plugin.py").write_text("raise ImportError('needs libfoo')\n")


def test_broken_plugin_is_reported_once_and_skipped(tmp_path: Path) -> None:
    _broken_distribution(tmp_path)
    result = run_archs({}, tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert "qwen3_moe" in [a["name"] for a in payload["archs"]]
    assert "needs libfoo" in payload["plugin_errors"]["broken"]
    assert result.stderr.count("mach plugin 'broken'") <= 1


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path: Path) -> None:
    _broken_distribution(tmp_path)
    result = run_archs({"MACH_STRICT_PLUGINS": "1"}, tmp_path)
    assert result.returncode != 0
    assert (
        "mach plugin 'broken' (distribution mach-broken-plugin) failed to import" in result.stderr
    )
    assert "needs libfoo" in result.stderr


class _FakeAdapter(MoeArchAdapter):
    name = "fake_moe"
    model_types = ("fake_moe",)

    def build_model(self, config: dict[str, Any]) -> Any:
        raise AssertionError("not built in this test")


class _FakePlugin:
    __name__ = "fake-plugin"

    @hookimpl
    def register_archs(self, register: Any) -> None:
        register(_FakeAdapter)

    @hookimpl
    def detect_arch(self, config: dict[str, Any], tensor_names: frozenset[str]) -> str | None:
        return "fake_moe" if "fake.marker" in tensor_names else None


def test_a_plugin_object_registers_and_detects() -> None:
    plugins.load_plugins()
    plugins.pm.register(_FakePlugin(), name="fake-plugin")
    REGISTRY.refresh()
    try:
        from mach import detect_arch

        assert "fake_moe" in REGISTRY
        claimed = detect_arch({"model_type": "qwen3_moe"}, {"fake.marker"})
        assert claimed.name == "fake_moe"
        assert detect_arch({"model_type": "qwen3_moe"}).name == "qwen3_moe"
    finally:
        plugins.pm.unregister(name="fake-plugin")
        REGISTRY.refresh()
    assert "fake_moe" not in REGISTRY


def test_loading_twice_is_harmless() -> None:
    before = sorted(REGISTRY)
    plugins.load_plugins()
    REGISTRY.refresh()
    assert sorted(REGISTRY) == before


@pytest.mark.parametrize("spec", ["no_colon_here", 42])
def test_bad_adapter_specs_are_rejected(spec: Any) -> None:
    from mach.errors import AdapterError

    REGISTRY.register(spec, name="bad_spec")
    try:
        with pytest.raises(AdapterError):
            REGISTRY["bad_spec"]
    finally:
        REGISTRY.unregister("bad_spec")
