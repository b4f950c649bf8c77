"""Typed reads of ``config.json``: a family's ``ModelArgs`` filled from its field annotations.

Every problem is a ``ConfigError`` that names the key at fault by its path in the file
(``text_config.hidden_size``, ``mlp_only_layers[1]``), what was expected and what was found.
The message leaves out the file itself; the loader adds it.

The rules, by annotation:

- ``int``: a JSON integer. A number with a fractional part (``2.5``) is an error; an integral
  one (``2.0``) is accepted as the integer, because JSON has a single number type and some
  writers emit every number as a float. ``true``/``false`` are never integers.
- ``float``: any JSON number (integers included), never a boolean.
- ``bool``: only ``true`` or ``false``; ``"yes"``, ``1`` and ``0`` are errors.
- ``str``; ``Literal[...]`` (one of the listed values); ``Any`` (anything).
- ``list[T]``, ``dict[str, T]``, a nested dataclass (a JSON object): each item is checked, and
  named by its path.
- ``X | None`` accepts ``null``. For a field whose type does not, ``null`` means "not set": the
  default applies, and a field without a default is reported missing.
- ``Annotated[int, AtLeast(n)]`` (``PositiveInt`` for ``n = 1``) also bounds the value.

Keys the dataclass does not name are ignored. Nothing here imports MLX.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from mach.errors import ConfigError

T = TypeVar("T")
Lookup = Callable[[str], tuple[bool, Any, str]]
"""``lookup(field) -> (present, value, path)``: where a dataclass field's value comes from."""


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """The smallest value a number field accepts: ``Annotated[int, AtLeast(0)]``."""

    minimum: int


PositiveInt = Annotated[int, AtLeast(1)]
"""A count or a dimension: an integer of at least 1."""


class ConfigReader:
    """Reads one config mapping into dataclasses and checks values across fields.

    ``section`` names a nested object whose keys take precedence over the top level (the
    ``text_config`` of multimodal wrappers); keys missing from it are looked up at the top
    level. The reader remembers where each field was read, so ``path`` and the checks name the
    key as the file spells it.
    """

    def __init__(self, config: Mapping[str, Any], section: str | None = None) -> None:
        self.config = config
        self.section: Mapping[str, Any] | None = None
        self.section_name = section
        if section is not None and config.get(section) is not None:
            inner = config[section]
            if not isinstance(inner, Mapping):
                raise ConfigError(f"{section} should be {describe(dict)}, found {found(inner)}")
            self.section = inner
        self._paths: dict[str, str] = {}

    def path(self, name: str) -> str:
        """Where field ``name`` was read from, or where it would be looked for."""
        if name in self._paths:
            return self._paths[name]
        return f"{self.section_name}.{name}" if self.section is not None else name

    def _lookup(self, key: str) -> tuple[bool, Any, str]:
        if self.section is not None and key in self.section:
            return True, self.section[key], f"{self.section_name}.{key}"
        if key in self.config:
            return True, self.config[key], key
        return False, None, self.path(key)

    def fields(self, cls: type[T], skip: Collection[str] = (),
               aliases: Mapping[str, str] | None = None) -> T:  # fmt: skip
        """An instance of dataclass ``cls`` with every field (except ``skip``) read from the
        config. ``aliases`` maps a field to another key read when the field's own is absent
        (``{"num_experts": "num_local_experts"}``)."""
        aliases = aliases or {}

        def lookup(name: str) -> tuple[bool, Any, str]:
            present, raw, where = self._lookup(name)
            if (not present or raw is None) and name in aliases:
                other = self._lookup(aliases[name])
                if other[0] and other[1] is not None:
                    present, raw, where = other
            self._paths[name] = where
            return present, raw, where

        def missing(name: str) -> str:
            where = self.path(name)
            return f"{where} (or {aliases[name]})" if name in aliases else where

        return _fill(cls, lookup, missing, skip)

    def at_most(self, args: object, name: str, limit: str) -> None:
        """Field ``name`` must not exceed field ``limit``."""
        value, bound = getattr(args, name), getattr(args, limit)
        if value > bound:
            raise ConfigError(
                f"{self.path(name)} ({value}) is more than {self.path(limit)} ({bound})"
            )

    def multiple_of(self, args: object, name: str, divisor: str, why: str = "") -> None:
        """Field ``name`` must be a whole multiple of field ``divisor``."""
        value, by = getattr(args, name), getattr(args, divisor)
        if value % by:
            raise ConfigError(
                f"{self.path(name)} ({value}) is not a multiple of {self.path(divisor)} ({by})"
                + (f"; {why}" if why else "")
            )

    def per_layer(self, args: object, name: str, layers: str = "num_hidden_layers") -> None:
        """List field ``name`` must have an entry for each of ``layers`` layers."""
        entries, count = getattr(args, name), getattr(args, layers)
        if len(entries) < count:
            raise ConfigError(
                f"{self.path(name)} has {len(entries)} entries but {self.path(layers)} is "
                f"{count}; give one per layer"
            )


def config_fields(
    cls: type[T],
    config: Mapping[str, Any],
    *,
    section: str | None = None,
    skip: Collection[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> T:
    """Dataclass ``cls`` filled from ``config`` by its annotations (see the module's rules).

    ``section``, ``skip`` and ``aliases`` are as for ``ConfigReader``. Raises ``ConfigError``
    naming the first key that is missing or has a value of the wrong type.
    """
    return ConfigReader(config, section).fields(cls, skip, aliases)


def config_value(value: Any, annotation: Any, path: str) -> Any:
    """``value`` checked (and converted) against a type annotation; ``path`` names it in errors."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *marks = get_args(annotation)
        try:
            out = config_value(value, base, path)
        except ConfigError:
            if _container_kind(base) is not None:
                raise
            raise _mismatch(path, annotation, value) from None
        for mark in marks:
            if isinstance(mark, AtLeast) and out is not None and out < mark.minimum:
                raise _mismatch(path, annotation, value)
        return out
    if annotation is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(get_args(annotation)):
            return None
        kind = _container_kind(options[0]) if len(options) == 1 else None
        if kind is not None and isinstance(value, kind):
            return config_value(value, options[0], path)
        for option in options:
            try:
                return config_value(value, option, path)
            except ConfigError:
                pass
        raise _mismatch(path, annotation, value)
    if origin is Literal:
        for choice in get_args(annotation):
            if value == choice and type(value) is type(choice):
                return choice
        raise _mismatch(path, annotation, value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = get_args(annotation) or (Any,)
            return [config_value(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif annotation is dict or origin is dict:
        if isinstance(value, Mapping):
            key_type, item = get_args(annotation) or (Any, Any)
            return {config_value(k, key_type, path): config_value(v, item, f"{path}.{k}")
                    for k, v in value.items()}  # fmt: skip
    elif isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, Mapping):
            nested: Mapping[str, Any] = value

            def lookup(name: str) -> tuple[bool, Any, str]:
                return name in nested, nested.get(name), f"{path}.{name}"

            return _fill(annotation, lookup, lambda name: f"{path}.{name}", ())
    else:
        raise TypeError(f"config annotation {annotation!r} at {path} is not supported")
    raise _mismatch(path, annotation, value)


def describe(annotation: Any) -> str:
    """What an annotation accepts, in the words of JSON."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        bounds = [m.minimum for m in args[1:] if isinstance(m, AtLeast)]
        if not bounds:
            return describe(args[0])
        if args[0] is int and bounds == [1]:
            return "a positive integer"
        return f"{describe(args[0])} of at least {max(bounds)}"
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(json.dumps(a) for a in args)
    if annotation is list or origin is list:
        item = args[0] if args else Any
        while get_origin(item) is Annotated:
            item = get_args(item)[0]
        if get_origin(item) is Literal:
            item = type(get_args(item)[0])
        plural = _PLURALS.get(item)
        return f"a list of {plural}" if plural else "a list"
    if annotation is dict or origin is dict or dataclasses.is_dataclass(annotation):
        return "an object"
    return _NAMES.get(annotation, repr(annotation))


def found(value: Any) -> str:
    """A config value as the file spells it (JSON), shortened when long."""
    shown = json.dumps(value, default=repr)
    return shown if len(shown) <= 60 else shown[:57] + "..."


_NAMES: dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false",
                          str: "a string", type(None): "null", Any: "any value"}  # fmt: skip
_PLURALS: dict[Any, str] = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _mismatch(path: str, annotation: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path} should be {describe(annotation)}, found {found(value)}")


def _container_kind(annotation: Any) -> Any:
    """The Python types a list, dict or dataclass annotation takes, else ``None``. An error
    inside such a value names the item at fault, so it is passed on as it is."""
    if annotation is list or get_origin(annotation) is list:
        return (list, tuple)
    if annotation is dict or get_origin(annotation) is dict or dataclasses.is_dataclass(annotation):
        return Mapping
    return None


def _admits_none(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        return _admits_none(get_args(annotation)[0])
    return annotation is Any or type(None) in get_args(annotation)


def _fill(cls: type[T], lookup: Lookup, missing: Callable[[str], str],
          skip: Collection[str]) -> T:  # fmt: skip
    hints = get_type_hints(cls, include_extras=True)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in skip or not field.init:
            continue
        annotation = hints[field.name]
        present, raw, where = lookup(field.name)
        if not present or (raw is None and not _admits_none(annotation)):
            required = (field.default is dataclasses.MISSING
                        and field.default_factory is dataclasses.MISSING)  # fmt: skip
            if required:
                state = "is null" if present else "is missing"
                raise ConfigError(f"{missing(field.name)} {state}; it should be "
                                  f"{describe(annotation)}")  # fmt: skip
            continue
        values[field.name] = config_value(raw, annotation, where)
    return cls(**values)
