"""Sampling flags shared by the commands that generate text (``generate``, ``chat``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer

from mach.cli.residency import grouped_flags

if TYPE_CHECKING:
    from mach.decode.params import SamplingParams

F = TypeVar("F", bound=Callable[..., Any])

_SAMPLING_FLAGS: dict[str, tuple[Any, Any]] = {
    "temp": (Annotated[float, typer.Option("--temp", min=0.0, help="0 is greedy.")], 0.0),
    "top_p": (Annotated[float, typer.Option("--top-p")], 1.0),
    "top_k": (Annotated[int, typer.Option("--top-k", min=0)], 0),
    "min_p": (Annotated[float, typer.Option("--min-p")], 0.0),
    "repetition_penalty": (Annotated[float, typer.Option("--repetition-penalty")], 1.0),
    "seed": (
        Annotated[Optional[int], typer.Option(help="Seed for sampling.")],  # noqa: UP045
        None,
    ),
    "stop": (
        Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")],  # noqa: UP045
        None,
    ),
}


def _params(max_tokens: int, temp: float, stop: list[str] | None, **rest: Any) -> SamplingParams:
    from mach.decode.params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temp, stop=list(stop or []), **rest)


def takes_sampling_options(max_tokens: int) -> Callable[[F], F]:
    """Give a command the sampling flags (``--max-tokens`` defaulting to ``max_tokens``); it
    receives them as one ``params: SamplingParams``, validated before the model loads."""
    most = Annotated[int, typer.Option("--max-tokens", "-n", min=0, help="Most new tokens.")]
    flags = {"max_tokens": (most, max_tokens), **_SAMPLING_FLAGS}

    def decorate(command: F) -> F:
        return grouped_flags(command, flags, "params", _params)

    return decorate
