"""Entry point of mach-adapter-deepseek: registers ``deepseek_v4`` and its MTP drafter."""

from __future__ import annotations

from typing import Any

from mach import hookimpl


@hookimpl
def register_archs(register: Any) -> None:
    register("mach_adapter_deepseek.adapter:DeepseekV4Adapter", name="deepseek_v4")


@hookimpl
def register_drafters(register: Any) -> None:
    register("mtp_eagle3", "mach_adapter_deepseek.mtp:make_mtp_drafter")
