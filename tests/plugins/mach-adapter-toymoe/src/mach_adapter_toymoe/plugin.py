"""Entry point: registers ``toy_moe``."""

from __future__ import annotations

from typing import Any

from mach import hookimpl


@hookimpl
def register_archs(register: Any) -> None:
    register("mach_adapter_toymoe.adapter:ToyMoeAdapter", name="toy_moe")
