"""The one plugin manager: built-in hookimpls and ``mach.adapters`` entry points."""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field

import importlib_metadata
import pluggy

from mach import hookspecs
from mach.env import env_flag

ENTRY_POINT_GROUP = "mach.adapters"
ALLOW_ENV = "MACH_LOAD_PLUGINS"
STRICT_ENV = "MACH_STRICT_PLUGINS"

DEFAULT_PLUGINS: tuple[str, ...] = ()

log = logging.getLogger("mach.plugins")

pm = pluggy.PluginManager("mach")
pm.add_hookspecs(hookspecs)


@dataclass
class PluginRecord:
    """Where a loaded plugin came from."""

    name: str
    distribution: str | None = None
    version: str | None = None


@dataclass
class _State:
    loaded: bool = False
    records: dict[str, PluginRecord] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


_state = _State()


class PluginLoadError(RuntimeError):
    """A plugin failed to import while strict plugin loading was on."""


def _strict() -> bool:
    return env_flag(STRICT_ENV, False)


def _allow_list() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def load_plugins(*, strict: bool | None = None) -> None:
    """Register built-in plugins and installed entry points; safe to call repeatedly.

    ``MACH_LOAD_PLUGINS`` is an allow-list of distribution names (empty means none). A plugin
    that fails to import is logged once and skipped, unless strict mode (``strict=True`` or
    ``MACH_STRICT_PLUGINS=1``) makes the failure fatal.
    """
    if _state.loaded:
        return
    strict = _strict() if strict is None else strict
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    allowed = _allow_list()
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else None
        if allowed is not None and dist_name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None or ep.name in _state.failures:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            _state.failures[ep.name] = message
            if strict:
                raise PluginLoadError(
                    f"mach plugin {ep.name!r} (distribution {dist_name}) failed to import: "
                    f"{message}"
                ) from exc
            log.warning("skipping mach plugin %r (%s): %s", ep.name, dist_name, message)
            continue
        pm.register(plugin, name=ep.name)
        _state.records[ep.name] = PluginRecord(
            ep.name, dist_name, dist.version if dist is not None else None
        )
    _state.loaded = True


def plugin_record(plugin_name: str) -> PluginRecord | None:
    """The distribution that provided a registered plugin, if it came from an entry point."""
    return _state.records.get(plugin_name)


def plugin_failures() -> dict[str, str]:
    """Plugins that failed to import, with the reason."""
    return dict(_state.failures)
