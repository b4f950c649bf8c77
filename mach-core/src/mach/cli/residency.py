"""Options and reports shared by commands that load a model: residency, loading, store stats."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer

if TYPE_CHECKING:
    from mach.io.load import LoadedModel
    from mach.io.options import LoadOptions

Streaming = Annotated[
    Optional[bool],  # noqa: UP045 - typer reads the annotation at run time
    typer.Option(
        "--streaming/--no-streaming",
        help="Stream routed experts from disk into bounded banks, or keep all resident. "
        "Default: stream only when the model would not fit in memory.",
    ),
]
ExpertBudget = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Memory for streamed experts, e.g. 1GB or 512MiB (implies --streaming)."),
]
StreamingEmbedding = Annotated[
    bool,
    typer.Option(help="Read token-embedding rows from disk on demand (untied embeddings)."),
]
Prefill = Annotated[
    str,
    typer.Option(help="Streaming prefill: transient (keep the decode bank) or resident."),
]
Draft = Annotated[
    Optional[bool],  # noqa: UP045
    typer.Option(
        "--draft/--no-draft",
        help="Speculative decoding with the family's draft (default: when present).",
    ),
]
DraftTokens = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--draft-tokens",
        min=1,
        max=16,
        help="Tokens drafted per verify pass (default: the draft's own; DFlash: its block).",
    ),
]
DraftPath = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--draft-path", help="A DFlash draft folder (default: <checkpoint>/draft)."),
]


Arch = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Architecture key; detected when omitted."),
]
DType = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Cast float weights: float32, float16 or bfloat16. Default: as stored (on a CPU, "
        "half precision computes in float32, which MLX multiplies there several times faster)."
    ),
]
Residency = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--expert-residency",
        help="Expert store by name: resident, streaming or bf16_streaming (float experts "
        "streamed into bfloat16 banks).",
    ),
]
KVBits = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--kv-bits",
        help="Store full-attention keys and values in this many bits: 2, 3 or 4 (TurboQuant), "
        "or 4 or 8 with --kv-format affine. Default: the model's dtype.",
    ),
]
KVFormat = Annotated[
    str,
    typer.Option("--kv-format", help="Quantized KV format for --kv-bits: turboquant or affine."),
]
SlotPool = Annotated[
    str,
    typer.Option(
        "--slot-pool",
        help="Streaming slots: layer (a bank per MoE layer) or shared (one pool for every "
        "layer, least recently used across them).",
    ),
]
Prewarm = Annotated[
    Optional[bool],  # noqa: UP045
    typer.Option(
        "--prewarm/--no-prewarm",
        help="Run a short forward at load, so the first request finds its kernels built and "
        "the weights in memory. Default: on for serve, off otherwise.",
    ),
]

Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="Run decode steps, verify passes and draft blocks as compiled graphs where the "
        "model allows (resident experts, full-attention KV caches).",
    ),
]

Parallel = Annotated[
    str,
    typer.Option(
        "--parallel",
        help="Under mlx.launch: expert (each rank holds a slice of every MoE layer's experts) "
        "or pipeline (each rank holds a run of whole layers).",
    ),
]


_LOAD_FLAGS: dict[str, tuple[Any, Any]] = {
    "arch": (Arch, None),
    "dtype": (DType, None),
    "streaming": (Streaming, None),
    "expert_budget": (ExpertBudget, None),
    "expert_residency": (Residency, None),
    "prefill": (Prefill, "transient"),
    "streaming_embedding": (StreamingEmbedding, False),
    "draft_path": (DraftPath, None),
    "kv_bits": (KVBits, None),
    "kv_format": (KVFormat, "turboquant"),
    "slot_pool": (SlotPool, "layer"),
    "prewarm": (Prewarm, None),
    "compile": (Compile, True),
    "parallel": (Parallel, "expert"),
}

F = TypeVar("F", bound=Callable[..., Any])


def _evaluated(annotation: Any, owner: Callable[..., Any]) -> Any:
    if isinstance(annotation, str):
        return eval(annotation, owner.__globals__)
    return annotation


GROUPED = ("options", "params")
"""Parameters a command receives built from a group of flags instead of as flags."""


def grouped_flags(
    command: F, flags: dict[str, tuple[Any, Any]], target: str, build: Callable[..., Any]
) -> F:
    """``command`` taking ``flags`` (name: (annotation, default)) in place of its ``target``
    parameter, which it receives as ``build(**flags)``. Groups stack: each wrapper passes the
    other groups' values through."""
    # Typer needs the command's annotations evaluated; the targets are only named for typing.
    signature = inspect.signature(command)
    kept = [p.replace(annotation=_evaluated(p.annotation, command))
            for p in signature.parameters.values() if p.name not in GROUPED]  # fmt: skip
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                               annotation=annotation)
             for name, (annotation, default) in flags.items()]  # fmt: skip

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in flags}
        return command(*args, **{target: build(**values)}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        **{p.name: p.annotation for p in kept},
        **{name: annotation for name, (annotation, _) in flags.items()},
    }
    return wrapper  # type: ignore[return-value]


def _load_options(**flags: Any) -> LoadOptions:
    from mach.io.options import LoadOptions

    return LoadOptions.from_kwargs(**flags)


def takes_load_options(command: F) -> F:
    """Give a command every load flag; it receives them as one ``options: LoadOptions``.

    The flags map onto ``LoadOptions`` here and nowhere else, so ``generate``, ``chat``,
    ``check``, ``bench`` and ``serve`` accept the same ones and validate them the same way.
    """
    return grouped_flags(command, _LOAD_FLAGS, "options", _load_options)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Say nothing while the model loads.")]


class LoadDisplay(logging.Handler):
    """Shows a load on stderr: the ``mach.load`` log lines and, on a terminal, the share of
    weight bytes read so far on one line that each new line replaces."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.tty = sys.stderr.isatty()
        self._shown: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.clear()
        sys.stderr.write(f"mach: {record.getMessage()}\n")
        sys.stderr.flush()

    def progress(self, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent == self._shown:
            return
        self._shown = percent
        sys.stderr.write(f"\rmach: reading weights {percent:3d}% "
                         f"({done / 1e9:.2f} of {total / 1e9:.2f} GB)")  # fmt: skip
        sys.stderr.flush()

    def clear(self) -> None:
        if self._shown is not None:
            sys.stderr.write("\r\033[K")
            self._shown = None


@contextmanager
def load_progress(quiet: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """While a model loads: its log lines on stderr and the ``progress`` callback to give
    ``load_moe`` (``None`` off a terminal). ``quiet`` shows nothing."""
    if quiet:
        yield None
        return
    display = LoadDisplay()
    logger = logging.getLogger("mach.load")
    logger.addHandler(display)
    level, logger.level = logger.level, logging.INFO
    try:
        yield display.progress if display.tty else None
    finally:
        display.clear()
        logger.removeHandler(display)
        logger.setLevel(level)


def load_model(path: Path | str, options: LoadOptions, quiet: bool = False) -> LoadedModel:
    """``load_moe`` with ``options``, showing its progress on stderr unless ``quiet``."""
    from mach.io.load import load_moe

    with load_progress(quiet) as progress:
        return load_moe(path, options=options, progress=progress)


def store_report(stats: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Streaming figures for a run of ``tokens`` tokens (empty for resident stores)."""
    if "hit_rate" not in stats:
        return {}
    return {
        "hit_rate": stats["hit_rate"],
        "bytes_read": stats["bytes_read"],
        "bytes_read_per_token": stats["bytes_read"] / tokens if tokens else 0.0,
        "read_gbps": stats["read_gbps"],
        "slot_pool": stats["slot_pool"],
        "slots_per_layer": stats["slots_per_layer"],
        "slots": stats["slots"],
        "budget_bytes": stats["budget_bytes"],
        "expert_bytes_on_disk": stats["expert_bytes_on_disk"],
    }


def store_line(report: dict[str, Any]) -> str:
    return (
        f"experts: hit rate {report['hit_rate']:.1%} | read {report['bytes_read'] / 1e6:.1f} MB "
        f"({report['bytes_read_per_token'] / 1e6:.2f} MB/token) at {report['read_gbps']:.2f} GB/s "
        f"| {slots_text(report)} in {report['budget_bytes'] / 1e9:.3f} GB"
    )


def slots_text(report: dict[str, Any]) -> str:
    if report.get("slot_pool") == "shared":
        return f"{report['slots']} shared slots"
    return f"{report['slots_per_layer']} slots/layer"
