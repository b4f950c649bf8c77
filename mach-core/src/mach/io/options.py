"""``LoadOptions``: every choice a load takes, typed and validated once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from mach.errors import OptionsError
from mach.experts.bank import SLOT_POOLS, PrefillMode, SlotPoolMode, parse_size
from mach.experts.parallel import ParallelMode

DType = Literal["float32", "float16", "bfloat16"]
Residency = Literal["resident", "streaming", "bf16_streaming"]

DTYPES: tuple[str, ...] = get_args(DType)
RESIDENCIES: tuple[str, ...] = get_args(Residency)
PREFILL_MODES: tuple[str, ...] = get_args(PrefillMode)
PARALLEL_MODES: tuple[str, ...] = get_args(ParallelMode)


def _choice(name: str, value: Any, allowed: tuple[str, ...], optional: bool) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise OptionsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _flag(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise OptionsError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a checkpoint. Construction validates every field; instances never change.

    ``streaming`` / ``expert_budget`` / ``expert_residency`` left unset let the loader choose:
    stream only when the model would not fit in memory. ``expert_budget`` accepts bytes or a
    size string and is stored as bytes.
    """

    arch: str | None = None
    """Architecture key; detected from the checkpoint when ``None``."""
    dtype: DType | None = None
    """Cast floating weights; ``None`` keeps the stored dtype (on a CPU, half precision is
    widened to float32, which MLX multiplies several times faster there)."""
    streaming: bool | None = None
    """``True`` streams routed experts through bounded banks, ``False`` keeps all resident."""
    expert_budget: int | None = None
    """Bytes of memory for streamed experts (implies streaming)."""
    expert_residency: Residency | None = None
    """The expert store by name: ``resident``, ``streaming`` or ``bf16_streaming``."""
    prefill: PrefillMode = "transient"
    """Streaming prefill: ``transient`` keeps the decode bank, ``resident`` goes through it."""
    gather_dispatch: bool | None = None
    """``False`` selects the per-expert loop; ``None`` reads ``LME_USE_GATHER_DISPATCH``."""
    verify_experts: bool = True
    """Check each sidecar record's CRC-32 as it is read."""
    streaming_embedding: bool = False
    """Leave an untied, unquantized token embedding on disk and read rows on demand."""
    draft_path: str | None = None
    """A draft checkpoint folder (DFlash) to use instead of the one beside the checkpoint."""
    kv_bits: int | None = None
    """Store full-attention keys and values in this many bits (``None``: the model's dtype)."""
    kv_format: str = "turboquant"
    """``turboquant`` (2, 3 or 4 bits) or ``affine`` (4 or 8 bits), with ``kv_bits``."""
    slot_pool: SlotPoolMode = "layer"
    """Streaming slots: ``layer`` gives each MoE layer its own bank, ``shared`` one pool for all."""
    prewarm: bool | None = None
    """Run a short forward at load (``mach.io.prewarm``); ``None`` leaves it to the command
    (``mach serve`` prewarms, the others do not)."""
    compile: bool = True
    """Run decode passes as compiled graphs (``mach.decode.compiled``) where the model and its
    caches allow it; ``False`` builds every pass op by op."""
    parallel: ParallelMode = "expert"
    """Under ``mlx.launch``: ``expert`` gives each rank a slice of every MoE layer's experts,
    ``pipeline`` a contiguous run of whole layers. One process ignores it."""

    def __post_init__(self) -> None:
        if self.arch is not None and (not isinstance(self.arch, str) or not self.arch):
            raise OptionsError(f"arch must be an architecture key, got {self.arch!r}")
        _choice("dtype", self.dtype, DTYPES, optional=True)
        _flag("streaming", self.streaming, optional=True)
        if self.expert_budget is not None:
            object.__setattr__(self, "expert_budget", parse_size(self.expert_budget))
        _choice("expert_residency", self.expert_residency, RESIDENCIES, optional=True)
        _choice("prefill", self.prefill, PREFILL_MODES, optional=False)
        _flag("gather_dispatch", self.gather_dispatch, optional=True)
        _flag("verify_experts", self.verify_experts, optional=False)
        _flag("streaming_embedding", self.streaming_embedding, optional=False)
        _flag("prewarm", self.prewarm, optional=True)
        _flag("compile", self.compile, optional=False)
        _choice("slot_pool", self.slot_pool, SLOT_POOLS, optional=False)
        _choice("parallel", self.parallel, PARALLEL_MODES, optional=False)
        from mach.cache.kv_quant import KV_FORMATS

        _choice("kv_format", self.kv_format, tuple(KV_FORMATS), optional=False)
        allowed = KV_FORMATS[self.kv_format]
        if self.kv_bits is not None and self.kv_bits not in allowed:
            raise OptionsError(f"kv_bits for {self.kv_format} must be one of "
                               f"{', '.join(map(str, allowed))}, got {self.kv_bits!r}")  # fmt: skip
        if self.draft_path is not None and (not isinstance(self.draft_path, str)
                                            or not self.draft_path):  # fmt: skip
            raise OptionsError(f"draft_path must be a folder path, got {self.draft_path!r}")
        wants_resident = self.streaming is False or self.expert_residency == "resident"
        if self.streaming is False and self.expert_residency not in (None, "resident"):
            raise OptionsError(
                f"streaming=False contradicts expert_residency={self.expert_residency!r}"
            )
        if self.streaming is True and self.expert_residency == "resident":
            raise OptionsError("streaming=True contradicts expert_residency='resident'")
        if wants_resident and self.expert_budget is not None:
            raise OptionsError(
                "an expert budget applies only to streaming; drop the budget or stream"
            )
        if wants_resident and self.slot_pool != "layer":
            raise OptionsError("slot_pool applies only to streaming; drop it or stream")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LoadOptions:
        """Options from ``load_moe``-style keywords; an unknown keyword is an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(kwargs.keys() - names)
        if unknown:
            raise OptionsError(
                f"unknown load option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)

    def with_defaults(self, **defaults: Any) -> LoadOptions:
        """A copy where each field still at its default takes the given value."""
        base = LoadOptions()
        changes = {k: v for k, v in defaults.items() if getattr(self, k) == getattr(base, k)}
        return LoadOptions(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
