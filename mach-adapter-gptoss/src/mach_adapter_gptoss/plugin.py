"""Entry point of mach-adapter-gptoss: registers ``gpt_oss``."""

from __future__ import annotations

from typing import Any

from mach import hookimpl


@hookimpl
def register_archs(register: Any) -> None:
    register("mach_adapter_gptoss.adapter:GptOssAdapter", name="gpt_oss")
