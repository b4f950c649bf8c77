"""The typed config reader: each rule, and errors naming the key, what it wants and what it got."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from mach.config import AtLeast, ConfigReader, PositiveInt, config_fields, config_value
from mach.errors import ConfigError


@dataclass
class Shape:
    head_dim: PositiveInt | None = None
    num_key_value_heads: PositiveInt | None = None


@dataclass
class Args:
    hidden_size: PositiveInt
    num_experts: int
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = False
    head_dim: int | None = None
    name: str = "toy"
    kind: Literal["dense", "moe"] = "moe"
    offset: Annotated[int, AtLeast(0)] = 0
    layer_ids: list[int] = field(default_factory=list)
    layer_types: list[Literal["sliding", "full"]] = field(default_factory=list)
    rates: dict[str, int] = field(default_factory=dict)
    rope: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, Shape] = field(default_factory=dict)
    size: int | str = 0
    derived: int = 0


BASE = {"hidden_size": 64, "num_experts": 8}


def error(config: dict[str, Any], **options: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config_fields(Args, config, **options)
    return str(info.value)


def test_fills_fields_by_annotation_and_ignores_unknown_keys() -> None:
    config = {**BASE, "rms_norm_eps": 1e-5, "norm_topk_prob": True, "head_dim": 16,
              "name": "x", "kind": "dense", "layer_ids": [1, 2], "layer_types": ["full"],
              "rates": {"a": 4}, "rope": {"rope_theta": 1e6, "rope_type": "yarn"},
              "per_layer": {"2": {"head_dim": 32, "other": "ignored"}}, "size": "big",
              "architectures": ["X"], "torch_dtype": "float32"}  # fmt: skip
    args = config_fields(Args, config)
    rope = {"rope_theta": 1e6, "rope_type": "yarn"}
    assert args == Args(64, 8, 1e-5, True, 16, "x", "dense", 0, [1, 2], ["full"], {"a": 4}, rope,
                        {"2": Shape(32)}, "big")  # fmt: skip


def test_defaults_fill_what_the_config_leaves_out() -> None:
    assert config_fields(Args, BASE) == Args(64, 8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_experts": "eight"}, 'num_experts should be an integer, found "eight"'),
        ({"num_experts": 2.5}, "num_experts should be an integer, found 2.5"),
        ({"num_experts": True}, "num_experts should be an integer, found true"),
        ({"hidden_size": 0}, "hidden_size should be a positive integer, found 0"),
        ({"hidden_size": "64"}, 'hidden_size should be a positive integer, found "64"'),
        ({"offset": -1}, "offset should be an integer of at least 0, found -1"),
        ({"rms_norm_eps": "x"}, 'rms_norm_eps should be a number, found "x"'),
        ({"rms_norm_eps": False}, "rms_norm_eps should be a number, found false"),
        ({"norm_topk_prob": "yes"}, 'norm_topk_prob should be true or false, found "yes"'),
        ({"norm_topk_prob": 1}, "norm_topk_prob should be true or false, found 1"),
        ({"name": 3}, "name should be a string, found 3"),
        ({"kind": "sparse"}, 'kind should be one of "dense", "moe", found "sparse"'),
        ({"head_dim": "16"}, 'head_dim should be an integer or null, found "16"'),
        ({"size": 1.5}, "size should be an integer or a string, found 1.5"),
    ],
)
def test_scalar_types(changes: dict[str, Any], message: str) -> None:
    assert error({**BASE, **changes}) == message


def test_numbers_convert_where_json_cannot_tell_them_apart() -> None:
    args = config_fields(Args, {**BASE, "hidden_size": 64.0, "rms_norm_eps": 1})
    assert args.hidden_size == 64 and type(args.hidden_size) is int
    assert args.rms_norm_eps == 1.0 and type(args.rms_norm_eps) is float


def test_missing_and_null_fields() -> None:
    assert error({"num_experts": 8}) == "hidden_size is missing; it should be a positive integer"
    assert error({**BASE, "hidden_size": None}) == (
        "hidden_size is null; it should be a positive integer"
    )
    # null means "not set" for a field that has a default, and is kept where the type allows it.
    args = config_fields(Args, {**BASE, "rms_norm_eps": None, "head_dim": None})
    assert args.rms_norm_eps == 1e-6 and args.head_dim is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_ids": 3}, "layer_ids should be a list of integers, found 3"),
        ({"layer_ids": [0, "1"]}, 'layer_ids[1] should be an integer, found "1"'),
        ({"layer_types": ["full", "local"]},
         'layer_types[1] should be one of "sliding", "full", found "local"'),
        ({"layer_types": "full"}, 'layer_types should be a list of strings, found "full"'),
        ({"rates": [4]}, "rates should be an object, found [4]"),
        ({"rates": {"csa": "four"}}, 'rates.csa should be an integer, found "four"'),
        ({"per_layer": {"2": {"head_dim": 0}}},
         "per_layer.2.head_dim should be a positive integer or null, found 0"),
        ({"per_layer": {"2": 32}}, "per_layer.2 should be an object, found 32"),
    ],
)  # fmt: skip
def test_containers_name_the_item_at_fault(changes: dict[str, Any], message: str) -> None:
    assert error({**BASE, **changes}) == message


def test_long_values_are_shortened() -> None:
    message = error({**BASE, "num_experts": "x" * 200})
    assert message == 'num_experts should be an integer, found "' + "x" * 56 + "..."


def test_a_section_takes_precedence_and_is_named() -> None:
    config = {"hidden_size": 1, "num_experts": 8, "text_config": {"hidden_size": 64}}
    assert config_fields(Args, config, section="text_config") == Args(64, 8)
    bad = {"num_experts": 8, "text_config": {"hidden_size": "wide"}}
    assert error(bad, section="text_config") == (
        'text_config.hidden_size should be a positive integer, found "wide"'
    )
    assert error({"text_config": {"hidden_size": 64}}, section="text_config") == (
        "text_config.num_experts is missing; it should be an integer"
    )
    # A key found only at the top level is named there.
    top_level = {"num_experts": "x", "text_config": {"hidden_size": 64}}
    assert error(top_level, section="text_config") == 'num_experts should be an integer, found "x"'
    assert error({**BASE, "text_config": [1]}, section="text_config") == (
        "text_config should be an object, found [1]"
    )
    assert config_fields(Args, BASE, section="text_config") == Args(64, 8)


def test_aliases_and_skipped_fields() -> None:
    alias = {"num_experts": "num_local_experts"}
    config = {"hidden_size": 64, "num_local_experts": 4, "derived": 9}
    args = config_fields(Args, config, aliases=alias, skip={"derived"})
    assert args.num_experts == 4 and args.derived == 0
    assert error({"hidden_size": 64, "num_local_experts": "four"}, aliases=alias) == (
        'num_local_experts should be an integer, found "four"'
    )
    assert error({"hidden_size": 64}, aliases=alias) == (
        "num_experts (or num_local_experts) is missing; it should be an integer"
    )


def test_checks_across_fields_name_each_key() -> None:
    @dataclass
    class Heads:
        num_attention_heads: PositiveInt
        num_key_value_heads: PositiveInt
        num_experts: PositiveInt
        num_experts_per_tok: PositiveInt
        layer_types: list[str] = field(default_factory=list)
        num_hidden_layers: PositiveInt = 2

    config = {"text_config": {"num_attention_heads": 6, "num_key_value_heads": 4,
                              "num_experts": 8, "num_experts_per_tok": 9},
              "layer_types": ["a"]}  # fmt: skip
    read = ConfigReader(config, section="text_config")
    args = read.fields(Heads)
    with pytest.raises(ConfigError) as info:
        read.at_most(args, "num_experts_per_tok", "num_experts")
    assert str(info.value) == (
        "text_config.num_experts_per_tok (9) is more than text_config.num_experts (8)"
    )
    with pytest.raises(ConfigError) as info:
        read.multiple_of(args, "num_attention_heads", "num_key_value_heads", "say why")
    assert str(info.value) == (
        "text_config.num_attention_heads (6) is not a multiple of "
        "text_config.num_key_value_heads (4); say why"
    )
    with pytest.raises(ConfigError) as info:
        read.per_layer(args, "layer_types")
    assert str(info.value) == (
        "layer_types has 1 entries but text_config.num_hidden_layers is 2; give one per layer"
    )


def test_config_value_checks_a_single_value() -> None:
    assert config_value([1, 2.0], list[int], "ids") == [1, 2]
    assert config_value(None, PositiveInt | None, "x") is None
    with pytest.raises(ConfigError, match=r"^rope\.factor should be a number, found \"4\"$"):
        config_value("4", float, "rope.factor")
    with pytest.raises(ConfigError, match=r"^ids should be a list of integers or null, found 3$"):
        config_value(3, list[int] | None, "ids")
    with pytest.raises(ConfigError, match=r'^ids\[1\] should be an integer, found "x"$'):
        config_value([1, "x"], list[int] | None, "ids")
    with pytest.raises(TypeError, match="not supported"):
        config_value(1, set[int], "x")


def test_the_reader_imports_without_mlx() -> None:
    probe = "import sys, mach.config; print(any(m.startswith('mlx') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.stdout.strip() == "False", result.stderr
