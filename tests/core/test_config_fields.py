"""``config_fields`` and every family: a missing or mistyped config field is named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from mach import REGISTRY, load_moe
from mach.config import config_fields
from mach.errors import ConfigError

FIXTURES = Path(__file__).parents[1] / "fixtures"


@dataclass
class Example:
    size: int
    scale: float = 1.0
    flag: bool = False
    name: str = "x"
    window: int | None = None
    layers: list[int] = field(default_factory=list)
    kind: Literal["a", "b"] = "a"
    extra: dict[str, Any] = field(default_factory=dict)


def test_fields_are_read_by_their_annotations() -> None:
    got = config_fields(Example, {"size": 8.0, "scale": 2, "flag": True, "window": None,
                                  "layers": [1, 2], "kind": "b", "extra": {"k": 1},
                                  "unknown": object()})  # fmt: skip
    assert got == Example(8, 2.0, True, "x", None, [1, 2], "b", {"k": 1})
    assert isinstance(got.size, int) and isinstance(got.scale, float)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "required field 'size' is missing"),
        ({"size": None}, "required field 'size' is missing"),
        ({"size": "eight"}, "field 'size' must be an integer, got 'eight'"),
        ({"size": 2.5}, "field 'size' must be an integer, got 2.5"),
        ({"size": True}, "field 'size' must be an integer, got True"),
        ({"size": 1, "scale": "x"}, "field 'scale' must be a number, got 'x'"),
        ({"size": 1, "flag": "yes"}, "field 'flag' must be true or false, got 'yes'"),
        ({"size": 1, "window": "big"}, "field 'window' must be an integer, got 'big'"),
        ({"size": 1, "layers": 3}, "field 'layers' must be a list of integers, got 3"),
        ({"size": 1, "layers": [1, "2"]}, "field 'layers[1]' must be an integer, got '2'"),
        ({"size": 1, "kind": "c"}, "field 'kind' must be one of 'a', 'b', got 'c'"),
        ({"size": 1, "extra": [1]}, "field 'extra' must be an object, got [1]"),
    ],
)
def test_bad_fields_are_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as failure:
        config_fields(Example, config)
    assert str(failure.value) == message


CASES = [
    ("qwen3_moe/hf-per-expert", "qwen3_moe", "hidden_size", None),
    ("qwen3_moe/hf-per-expert", "qwen3_moe", "num_experts", "eight"),
    ("qwen3_moe/hf-per-expert", "qwen3_moe", "norm_topk_prob", "yes"),
    ("qwen3_moe/hf-per-expert", "qwen3_moe", "num_experts_per_tok", 99),
    ("qwen3_moe/hf-per-expert", "qwen3_moe", "num_key_value_heads", 3),
    ("qwen3_5_moe/hf-per-expert", "qwen3_5_moe", "linear_num_key_heads", None),
    ("qwen3_5_moe/hf-per-expert", "qwen3_5_moe", "num_hidden_layers", 2.5),
    ("gpt_oss/hf-float", "gpt_oss", "num_local_experts", "eight"),
    ("gpt_oss/hf-float", "gpt_oss", "sliding_window", "wide"),
    ("gemma4/hf", "gemma4", "moe_intermediate_size", None),
    ("gemma4/hf", "gemma4", "top_k_experts", 0),
    ("deepseek_v4/hf-fused", "deepseek_v4", "n_routed_experts", "many"),
    ("deepseek_v4/hf-fused", "deepseek_v4", "index_topk", -1),
]


def _family_config(layout: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((FIXTURES / layout / "config.json").read_text())
    return config


@pytest.mark.parametrize(("layout", "arch", "name", "value"), CASES)
def test_every_family_names_the_field(layout: str, arch: str, name: str, value: Any) -> None:
    config = _family_config(layout)
    target = config.get("text_config", config)
    if value is None:
        target.pop(name, None)
        config.pop(name, None)
    else:
        target[name] = value
    with pytest.raises(ConfigError, match=name):
        REGISTRY[arch].build_model(config)


def test_the_loader_names_config_json(tmp_path: Path) -> None:
    import shutil

    root = Path(shutil.copytree(FIXTURES / "qwen3_moe" / "hf-per-expert", tmp_path / "c"))
    config = _family_config("qwen3_moe/hf-per-expert")
    config["num_experts"] = "eight"
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as failure:
        load_moe(root)
    assert str(failure.value) == (
        f"{root / 'config.json'}: field 'num_experts' must be an integer, got 'eight'"
    )
