"""``config_fields``: a family's typed config read from ``config.json``, field by field.

Each family describes its config as a dataclass; this fills it from the JSON mapping by the
dataclass's annotations, so a missing or mistyped field becomes a ``ConfigError`` naming it
instead of a crash deep inside model construction or a model built from garbage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from mach.errors import ConfigError

T = TypeVar("T")

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind) if a is not type(None))
    if origin is list or origin is tuple:
        (item, *_) = typing.get_args(kind) or (Any,)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    if origin is dict or kind is dict:
        return "an object"
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """``value`` as ``kind``, or ``ConfigError`` naming ``where``."""
    if kind is Any:
        return value
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise _wrong(where, kind, value)
    if origin is typing.Literal:
        if value in typing.get_args(kind):
            return value
        raise _wrong(where, kind, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, kind, value)
        (item, *_) = typing.get_args(kind) or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise _wrong(where, kind, value)
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(where, kind, value)
    if kind is int:
        if isinstance(value, bool):
            raise _wrong(where, kind, value)
        if isinstance(value, int):
            return value
        # JSON writers sometimes spell whole numbers as 8.0; anything else is not a count.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _wrong(where, kind, value)
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong(where, kind, value)
    if kind is str:
        if isinstance(value, str):
            return value
        raise _wrong(where, kind, value)
    return value


def _wrong(where: str, kind: Any, value: Any) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return ConfigError(f"field {where!r} must be {_describe(kind)}, got {shown}")


def config_fields(cls: type[T], config: Mapping[str, Any], prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from ``config``, checked against its annotations.

    Unknown keys are ignored; a key whose value is ``null`` counts as absent. A required field
    that is absent, or a value of the wrong type, raises ``ConfigError`` naming the field (with
    ``prefix``, e.g. ``text_config.``). Ints are accepted for floats, and whole floats for ints.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        value = config.get(f.name)
        if value is None:
            required = (f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING)  # fmt: skip
            if required:
                raise ConfigError(f"required field {prefix + f.name!r} is missing")
            continue
        values[f.name] = _coerce(hints[f.name], value, prefix + f.name)
    return cls(**values)


def require(condition: bool, message: str) -> None:
    """``ConfigError(message)`` unless ``condition``: for values whose type is right but whose
    meaning is not (a head count that does not divide the width)."""
    if not condition:
        raise ConfigError(message)


def positive(args: Any, *names: str) -> None:
    """Each named field of ``args`` (that is set) is at least 1."""
    for name in names:
        value = getattr(args, name)
        require(value is None or value >= 1, f"field {name!r} must be at least 1, got {value!r}")


def check_attention(args: Any) -> None:
    """The fields every attention config shares: positive sizes, heads that group evenly, and a
    width that splits into heads when ``head_dim`` is left to be derived."""
    positive(args, "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "head_dim")  # fmt: skip
    heads, kv = args.num_attention_heads, args.num_key_value_heads
    require(heads % kv == 0, f"num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({kv})")  # fmt: skip
    if getattr(args, "head_dim", None) is None:
        width = args.hidden_size
        require(width % heads == 0,
                f"hidden_size ({width}) does not split into {heads} attention heads")  # fmt: skip
