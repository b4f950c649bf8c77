"""Boolean environment knobs (``LME_USE_GATHER_DISPATCH``, ``MACH_FUSE_GATE_UP`` ...)."""

from __future__ import annotations

import os

from mach.errors import MachError

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_flag(name: str, default: bool) -> bool:
    """The knob ``name`` as a bool; unset or empty means ``default``.

    Accepts 1/0, true/false, yes/no, on/off in any case; anything else is an error that names
    the variable, so a typo never silently picks a mode.
    """
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise MachError(
        f"environment variable {name}={os.environ[name]!r} is not a boolean; use 1 or 0"
    )
