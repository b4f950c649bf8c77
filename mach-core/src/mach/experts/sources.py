"""Where each routed expert's bytes live on disk, for stores that read experts on demand.

A ``LayerSource`` lists, for one MoE layer, the tensors (``pieces``) every expert has, e.g.
``gate_proj.weight`` or ``down_proj.scales``, with each expert's absolute file offset. The
engine's sidecar keeps an expert's pieces in one contiguous record (one read); stacked
safetensors keep each piece of expert ``e`` contiguous inside its tensor (one read per piece).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mach.errors import ShapeMismatchError
from mach.experts.switch import SwitchSpec
from mach.tensors import TensorInfo

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases", "bias")

# dtype names as safetensors and the sidecar index spell them -> (numpy storage, mlx view)
DTYPES: dict[str, tuple[type[np.generic], mx.Dtype]] = {
    "U8": (np.uint8, mx.uint8),
    "U32": (np.uint32, mx.uint32),
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
}


@dataclass(frozen=True)
class Piece:
    """One tensor of every expert of a layer: per-expert shape and file offsets."""

    part: str
    dtype: str
    shape: tuple[int, ...]
    files: tuple[Path, ...]
    offsets: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(DTYPES[self.dtype][0]).itemsize

    def to_mx(self, raw: memoryview) -> mx.array:
        """This piece of one expert, from its raw bytes."""
        storage, view = DTYPES[self.dtype]
        array = mx.array(np.frombuffer(raw, dtype=storage).reshape(self.shape))
        return array.view(view) if array.dtype != view else array


@dataclass(frozen=True)
class Record:
    """An expert's whole contiguous record (sidecar): offset and CRC-32 per expert.

    ``crc32`` checksums continue from ``described``, the CRC-32 of the index's description of the
    records, so they catch an edited index as well as changed bytes.
    """

    file: Path
    nbytes: int
    offsets: tuple[int, ...]
    crc32: tuple[int, ...]
    described: int = 0


@dataclass
class LayerSource:
    """Every piece of one MoE layer's experts, and (sidecar) their records."""

    prefix: str
    spec: SwitchSpec
    pieces: dict[str, Piece]
    records: Record | None = None

    @property
    def expert_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces.values())

    def check(self) -> None:
        """Each projection has a weight of the shape the switch spec implies."""
        e, d, h = self.spec.num_experts, self.spec.input_dims, self.spec.hidden_dims
        for piece in self.pieces.values():
            if len(piece.offsets) != e:
                raise ShapeMismatchError(
                    f"{piece.files[0]}: {self.prefix}.{piece.part} has {len(piece.offsets)} "
                    f"experts, config implies {e}"
                )
        for proj, out_dims, in_dims in (
            ("gate_proj", h, d),
            ("up_proj", h, d),
            ("down_proj", d, h),
        ):
            weight = self.pieces.get(f"{proj}.weight")
            if weight is None:
                raise ShapeMismatchError(f"{self.prefix}: no {proj}.weight for the routed experts")
            packed = weight.dtype in ("U32", "U8") and f"{proj}.scales" in self.pieces
            if weight.shape[0] != out_dims or (not packed and weight.shape[1] != in_dims):
                raise ShapeMismatchError(
                    f"{weight.files[0]}: {self.prefix}.{proj}.weight is {list(weight.shape)} per "
                    f"expert but the config implies [{out_dims}, {in_dims}]"
                )


def stacked_source(
    prefix: str,
    spec: SwitchSpec,
    tensors: Mapping[str, object],
    per_expert_name: Callable[[str, int, str, str], str | None] | None = None,
    stacked_names: Callable[[str, str, str], tuple[str, ...]] | None = None,
) -> LayerSource | None:
    """A layer's experts read straight from safetensors, or ``None`` if they cannot be.

    Works when the checkpoint stores each expert piece contiguously under a name the engine can
    find: stacked tensors already under engine names (``<switch>.<proj>.<part>``, as
    mlx-community checkpoints are), or one tensor per expert named by ``per_expert_name``.
    """
    pieces: dict[str, Piece] = {}
    e = spec.num_experts
    for proj in PROJECTIONS:
        for part in PARTS:
            key = f"{proj}.{part}"
            names = stacked_names(prefix, proj, part) if stacked_names else (f"{prefix}.{key}",)
            stacked = next((tensors[n] for n in names if n in tensors), None)
            if isinstance(stacked, TensorInfo):
                if stacked.shape[0] != e:
                    return None
                step = stacked.nbytes // e
                offsets = tuple(stacked.start + i * step for i in range(e))
                files = (stacked.file,) * e
                pieces[key] = Piece(key, stacked.dtype, stacked.shape[1:], files, offsets)
                continue
            if per_expert_name is None:
                continue
            per_expert = [per_expert_name(prefix, i, proj, part) for i in range(e)]
            infos = [tensors.get(n) if n else None for n in per_expert]
            if not all(isinstance(i, TensorInfo) for i in infos):
                continue
            first = infos[0]
            assert isinstance(first, TensorInfo)
            found = [i for i in infos if isinstance(i, TensorInfo)]
            if len({(i.dtype, i.shape) for i in found}) > 1:
                return None
            files = tuple(i.file for i in found)
            pieces[key] = Piece(key, first.dtype, first.shape, files, tuple(i.start for i in found))
    if not all(f"{proj}.weight" in pieces for proj in PROJECTIONS):
        return None
    _as_mxfp4(pieces)
    if any(p.dtype not in DTYPES for p in pieces.values()):
        return None
    return LayerSource(prefix, spec, pieces)


def _as_mxfp4(pieces: dict[str, Piece]) -> None:
    """E2M1 codes two per int8 with an E8M0 scale per 32 inputs are MLX's ``mxfp4`` bytes.

    The same bytes read as ``uint32`` words (eight codes each) and ``uint8`` scales, so such
    checkpoints stream without conversion; only the declared dtype and shape change.
    """
    for proj in PROJECTIONS:
        weight, scales = pieces.get(f"{proj}.weight"), pieces.get(f"{proj}.scales")
        if weight is None or scales is None or weight.dtype != "I8":
            continue
        if scales.dtype not in ("F8_E8M0", "U8") or weight.shape[-1] * 2 != scales.shape[-1] * 32:
            continue
        if weight.shape[-1] % 4:
            continue
        words = (*weight.shape[:-1], weight.shape[-1] // 4)
        pieces[f"{proj}.weight"] = Piece(weight.part, "U32", words, weight.files, weight.offsets)
        pieces[f"{proj}.scales"] = Piece(scales.part, "U8", scales.shape, scales.files,
                                         scales.offsets)  # fmt: skip
