"""``BankCache`` / ``LayerExpertBank``: a bounded bank of expert slots per layer, fed from disk."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import numpy as np

from mach.errors import MachError, OptionsError
from mach.experts.decode_reads import DecodeReads
from mach.experts.matrix import ExpertMatrix, ExpertWeights
from mach.experts.reader import ExpertReader
from mach.experts.sources import DTYPES, LayerSource, Piece
from mach.experts.store import ExpertStore, LayerExperts

PrefillMode = Literal["transient", "resident"]
SlotPoolMode = Literal["layer", "shared"]
SLOT_POOLS: tuple[SlotPoolMode, ...] = ("layer", "shared")

DECODE_TOKENS = 8
"""Calls of at most this many tokens per sequence are decode steps (a speculative verify pass is
the last token plus a few drafts; a batched step is one token for each of many sequences): they
go through the bank even in ``transient`` prefill mode."""


class BudgetError(MachError):
    """The expert budget cannot hold the experts one token needs."""


@dataclass
class PhaseCounts:
    """Bank lookups and disk reads of one phase (prefill chunks or decode steps)."""

    calls: int = 0
    """Layer calls; each looks up the distinct experts its tokens route to."""
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0

    def report(self) -> dict[str, Any]:
        looked_up = self.hits + self.misses
        return {"calls": self.calls, "hits": self.hits, "misses": self.misses,
                "bytes_read": self.bytes_read,
                "hit_rate": self.hits / looked_up if looked_up else 0.0}  # fmt: skip


@dataclass(frozen=True)
class _Target:
    """Where a piece lands in the bank: array name and first row."""

    name: str
    row: int


def _format(source: LayerSource, proj: str, input_dims: int) -> tuple[int | None, int | None, str]:
    weight, scales = source.pieces[f"{proj}.weight"], source.pieces.get(f"{proj}.scales")
    if scales is None:
        return None, None, "affine"
    bits = weight.shape[-1] * 32 // input_dims
    group = input_dims // scales.shape[-1]
    mode = "affine" if f"{proj}.biases" in source.pieces else "mxfp4"
    return bits, group, mode


def _bank_dtype(piece: Piece, quantized: bool, float_dtype: mx.Dtype | None = None) -> mx.Dtype:
    dtype = DTYPES[piece.dtype][1]
    if float_dtype is not None and not quantized and mx.issubdtype(dtype, mx.floating):
        return float_dtype
    widen = not quantized and dtype in (mx.float16, mx.bfloat16)
    # MLX's CPU gather_mm runs in float32 only.
    return mx.float32 if widen and mx.default_device() == mx.cpu else dtype


Shapes = dict[str, tuple[tuple[int, ...], mx.Dtype]]


class SlotPool:
    """Expert slots, one array per bank tensor, and which ``(layer, expert)`` each holds, least
    recently used first. A per-layer bank owns its pool; a shared pool serves every layer, so
    the budget goes to whichever layers' routing needs it."""

    def __init__(self, shapes: Shapes, slots: int) -> None:
        self.shapes = dict(shapes)
        self.slots = slots
        self.arrays = {name: mx.zeros((slots, *shape), dtype)
                       for name, (shape, dtype) in shapes.items()}  # fmt: skip
        mx.eval(list(self.arrays.values()))
        self.slot_of: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.free = list(range(slots))
        self.evictions = 0
        self.version = 0
        """Counts claims: every change of which expert a slot holds follows one."""

    def claim(self, keep: set[tuple[str, int]]) -> int | None:
        """A free slot, else the least recently used one not in ``keep``; ``None`` when every
        slot holds an expert of ``keep``."""
        self.version += 1
        if self.free:
            return self.free.pop()
        victim = next((key for key in self.slot_of if key not in keep), None)
        if victim is None:
            return None
        self.evictions += 1
        return self.slot_of.pop(victim)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class LayerExpertBank(LayerExperts):
    """A fixed number of expert slots for one layer; misses are read from disk.

    ``route`` reads the routed ids back to the host (the one sync per layer), reads the missing
    experts concurrently, writes them into free or least-recently-used slots (never a slot the
    same call needs) and returns slot indices. Calls that route to more distinct experts than
    there are slots, and prefill chunks (more than ``DECODE_TOKENS`` tokens per sequence) in
    ``transient`` mode, get a temporary set of the experts they need instead. A prefill chunk
    leaves the bank (the decode working set) untouched; a decode step whose experts outnumber
    the slots (a large batch) also keeps what it read in the slots of experts it does not need,
    so the next step finds more of the batch's experts resident.
    """

    def __init__(
        self,
        source: LayerSource,
        slots: int | SlotPool,
        reader: ExpertReader,
        prefill: PrefillMode = "transient",
        float_dtype: mx.Dtype | None = None,
    ) -> None:
        self.source = source
        self.reader = reader
        self.prefill = prefill
        spec = source.spec
        formats = {
            "gate_proj": _format(source, "gate_proj", spec.input_dims),
            "up_proj": _format(source, "up_proj", spec.input_dims),
            "down_proj": _format(source, "down_proj", spec.hidden_dims),
        }
        gate_parts = {k.split(".")[1]: p for k, p in source.pieces.items() if k.startswith("gate_")}
        up_parts = {k.split(".")[1]: p for k, p in source.pieces.items() if k.startswith("up_")}
        fuse = formats["gate_proj"] == formats["up_proj"] and {
            k: (p.dtype, p.shape) for k, p in gate_parts.items()
        } == {k: (p.dtype, p.shape) for k, p in up_parts.items()}
        self._targets: dict[str, _Target] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], mx.Dtype]] = {}
        for name, piece in source.pieces.items():
            proj, part = name.split(".")
            quantized = formats[proj][0] is not None
            dtype = _bank_dtype(piece, quantized, float_dtype)
            if fuse and proj in ("gate_proj", "up_proj"):
                bank_name = f"gate_up.{part}"
                row = 0 if proj == "gate_proj" else piece.shape[0]
                self._shapes[bank_name] = ((2 * piece.shape[0], *piece.shape[1:]), dtype)
            else:
                bank_name, row = name, 0
                self._shapes[bank_name] = (piece.shape, dtype)
            self._targets[name] = _Target(bank_name, row)
        self._fused = fuse
        self._formats = formats
        if isinstance(slots, SlotPool):
            if slots.shapes != self._shapes:
                raise OptionsError(
                    f"{source.prefix}: a shared slot pool needs every MoE layer's experts in one "
                    "shape and format, and this layer's differ; use per-layer banks "
                    "(slot_pool='layer')"
                )
            self.pool = slots
        else:
            self.pool = SlotPool(self._shapes, slots)
        self.weights = self._weights(self.arrays)
        # MLX's CPU gather kernel computes in float32 only: half-precision banks are widened
        # for each call there, keeping the memory saving; other devices use them as they are.
        self._widen = (
            float_dtype is not None and float_dtype != mx.float32 and mx.default_device() == mx.cpu
        )
        self._lut = np.zeros(spec.num_experts, dtype=np.uint32)
        # The expert -> slot table on the device, uploaded again only after a slot changes, so a
        # call whose experts are all held maps ids to slots on the device (the ids still come
        # back to the host once per call, to find the misses).
        self._lut_device = mx.array(self._lut)
        self.hits = self.misses = self.transient_calls = 0
        self.phases = {"prefill": PhaseCounts(), "decode": PhaseCounts()}
        self._expert_bytes = source.expert_bytes
        self.deferred: list[DeferredCall] | None = None
        """While set, decode calls map ids to slots on the device and are appended here
        (``mach.experts.device_routing``); nothing crosses to the host."""
        self.fetched: set[int] = set()
        """Experts ``fetch`` read for the device-routed step under way."""
        self._tables_at = -1
        self._slot_table = self._held_table = mx.array(0)

    @property
    def arrays(self) -> dict[str, mx.array]:
        return self.pool.arrays

    @property
    def slots(self) -> int:
        return self.pool.slots

    def held(self) -> list[int]:
        """The experts of this layer in slots now, in id order."""
        prefix = self.source.prefix
        return sorted(e for layer, e in self.pool.slot_of if layer == prefix)

    def _key(self, expert: int) -> tuple[str, int]:
        return (self.source.prefix, expert)

    def _count(self, prefill: bool, hits: int, misses: int, calls: int = 1) -> None:
        self.hits += hits
        self.misses += misses
        phase = self.phases["prefill" if prefill else "decode"]
        phase.calls += calls
        phase.hits += hits
        phase.misses += misses
        phase.bytes_read += misses * self._expert_bytes

    def _weights(self, arrays: Mapping[str, mx.array]) -> ExpertWeights:
        def matrix(prefix: str, proj: str) -> ExpertMatrix:
            bits, group, mode = self._formats[proj]
            return ExpertMatrix(
                weight=arrays[f"{prefix}.weight"],
                scales=arrays.get(f"{prefix}.scales"),
                biases=arrays.get(f"{prefix}.biases"),
                bias=arrays.get(f"{prefix}.bias"),
                bits=bits,
                group_size=group,
                mode=mode,
            )

        down = matrix("down_proj", "down_proj")
        if self._fused:
            return ExpertWeights(down=down, gate_up=matrix("gate_up", "gate_proj"))
        return ExpertWeights(down=down, gate=matrix("gate_proj", "gate_proj"),
                             up=matrix("up_proj", "up_proj"))  # fmt: skip

    def _compute(self, arrays: Mapping[str, mx.array]) -> ExpertWeights:
        if not self._widen:
            return self.weights if arrays is self.arrays else self._weights(arrays)
        return self._weights(
            {
                name: a.astype(mx.float32)
                if mx.issubdtype(a.dtype, mx.floating) and not self._quantized(name)
                else a
                for name, a in arrays.items()
            }
        )

    def _quantized(self, bank_name: str) -> bool:
        proj = "gate_proj" if bank_name.startswith("gate_up") else bank_name.split(".")[0]
        return self._formats[proj][0] is not None

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    def _pieces(self, raw: Mapping[str, memoryview]) -> dict[str, mx.array]:
        out = {}
        for name, view in raw.items():
            piece = self.source.pieces[name]
            out[name] = piece.to_mx(view).astype(self._shapes[self._targets[name].name][1])
        return out

    def _write(self, slot: int, raw: Mapping[str, memoryview]) -> None:
        for name, value in self._pieces(raw).items():
            target = self._targets[name]
            rows = value.shape[0]
            self.arrays[target.name][slot, target.row : target.row + rows] = value

    def _expert_arrays(self, raw: Mapping[str, memoryview]) -> dict[str, mx.array]:
        parts: dict[str, list[tuple[int, mx.array]]] = {}
        for name, value in self._pieces(raw).items():
            target = self._targets[name]
            parts.setdefault(target.name, []).append((target.row, value))
        return {
            name: found[0][1]
            if len(found) == 1
            else mx.concatenate([value for _, value in sorted(found, key=lambda item: item[0])])
            for name, found in parts.items()
        }

    def route(self, indices: mx.array) -> tuple[ExpertWeights, mx.array]:
        if self.deferred is not None and (indices.shape[-2] if indices.ndim >= 2 else 1) <= (
            DECODE_TOKENS
        ):
            return self._route_on_device(indices)
        ids = np.asarray(indices).astype(np.int64)
        wanted = [int(e) for e in np.unique(ids)]
        per_sequence = ids.shape[-2] if ids.ndim >= 2 else 1
        prefill = per_sequence > DECODE_TOKENS
        if prefill and self.prefill == "transient":
            return self._transient(wanted, ids, prefill, keep=False)
        if len(wanted) > self.slots:
            return self._transient(wanted, ids, prefill, keep=not prefill)
        slot_of, key = self.pool.slot_of, self._key
        missing = [e for e in wanted if key(e) not in slot_of]
        self._count(prefill, len(wanted) - len(missing), len(missing))
        for e in wanted:
            if key(e) in slot_of:
                slot_of.move_to_end(key(e))
        if missing:
            keep = {key(e) for e in wanted}
            # At most ``slots`` experts are wanted, so enough slots lie outside ``keep``.
            free = [self.pool.claim(keep) for _ in missing]
            for expert, slot, raw in zip(
                missing, free, self.reader.read(self.source, missing), strict=True
            ):
                assert slot is not None
                self._write(slot, raw)
                slot_of[key(expert)] = slot
        self._sync_lut(wanted)
        return self._compute(self.arrays), self._lut_device[indices]

    def _route_on_device(self, indices: mx.array) -> tuple[ExpertWeights, mx.array]:
        """Slots for ``indices`` from tables of the whole bank, with a device flag that says
        whether every routed expert is held; the caller checks the flag before using the
        output and then ``settle``s the call (or redoes the step through ``route``)."""
        if self._tables_at != self.pool.version:
            slots = np.zeros(self.source.spec.num_experts, dtype=np.uint32)
            held = np.zeros(self.source.spec.num_experts, dtype=np.bool_)
            prefix = self.source.prefix
            for (layer, expert), slot in self.pool.slot_of.items():
                if layer == prefix:
                    slots[expert], held[expert] = slot, True
            self._slot_table, self._held_table = mx.array(slots), mx.array(held)
            self._tables_at = self.pool.version
        assert self.deferred is not None
        self.deferred.append(DeferredCall(self, indices, mx.all(self._held_table[indices])))
        return self._compute(self.arrays), self._slot_table[indices]

    def settle(self, indices: mx.array) -> None:
        """Count a device-routed call whose experts were all held, and mark them used; the
        experts ``fetch`` read for this step were counted as misses there."""
        wanted = [int(e) for e in np.unique(np.asarray(indices))]
        self._count(False, len([e for e in wanted if e not in self.fetched]), 0)
        self.fetched.clear()
        slot_of = self.pool.slot_of
        for e in wanted:
            slot_of.move_to_end(self._key(e))

    def fetch(self, indices: mx.array) -> None:
        """Read the experts of a dropped device-routed call that the bank lacks into slots
        (never over the call's other experts), so the step can run on the device again."""
        wanted = [int(e) for e in np.unique(np.asarray(indices))]
        if len(wanted) > self.slots:
            return  # they cannot all be held; the host path gives the call a temporary set
        key, slot_of = self._key, self.pool.slot_of
        for e in wanted:
            if key(e) in slot_of:
                slot_of.move_to_end(key(e))
        missing = [e for e in wanted if key(e) not in slot_of]
        if not missing:
            return
        keep = {key(e) for e in wanted}
        free = [self.pool.claim(keep) for _ in missing]
        for expert, slot, raw in zip(
            missing, free, self.reader.read(self.source, missing), strict=True
        ):
            assert slot is not None
            self._write(slot, raw)
            slot_of[key(expert)] = slot
        self._count(False, 0, len(missing), calls=0)
        self.fetched.update(missing)

    def _sync_lut(self, experts: list[int]) -> None:
        """Point the slot table at where ``experts`` now live (a shared pool may have moved
        them since this layer's last call); upload it only when an entry changed."""
        slots = [self.pool.slot_of[self._key(e)] for e in experts]
        if (self._lut[experts] != slots).any():
            self._lut[experts] = slots
            self._lut_device = mx.array(self._lut)

    def _transient(
        self, wanted: list[int], ids: np.ndarray, prefill: bool, keep: bool
    ) -> tuple[ExpertWeights, mx.array]:
        """The call's experts as a temporary stack; ``keep`` also puts what was read into the
        slots of experts the call does not need, least recently used first."""
        self.transient_calls += 1
        slot_of, key = self.pool.slot_of, self._key
        held = [e for e in wanted if key(e) in slot_of]
        missing = [e for e in wanted if key(e) not in slot_of]
        self._count(prefill, len(held), len(missing))
        read = dict(zip(missing, self.reader.read(self.source, missing), strict=True))
        # One take per bank array for the experts already held (not a slice per expert), then
        # the ones just read: a decode step over a large batch builds its set in a few ops.
        parts: dict[str, list[mx.array]] = {name: [] for name in self.arrays}
        if held:
            slots = mx.array([slot_of[key(e)] for e in held], dtype=mx.uint32)
            for name, bank in self.arrays.items():
                parts[name].append(mx.take(bank, slots, axis=0))
        fresh = {e: self._expert_arrays(read[e]) for e in missing}
        if fresh:
            for name in parts:
                parts[name].append(mx.stack([arrays[name] for arrays in fresh.values()]))
        stacked = {
            name: values[0] if len(values) == 1 else mx.concatenate(values)
            for name, values in parts.items()
        }
        lut = np.zeros(self.source.spec.num_experts, dtype=np.uint32)
        lut[held + missing] = np.arange(len(wanted), dtype=np.uint32)
        if keep:
            self._keep_read(fresh, wanted)
        return self._compute(stacked), mx.array(lut[ids])

    def _keep_read(self, fresh: Mapping[int, Mapping[str, mx.array]], wanted: list[int]) -> None:
        slot_of, key = self.pool.slot_of, self._key
        for e in wanted:
            if key(e) in slot_of:
                slot_of.move_to_end(key(e))
        keep = {key(e) for e in wanted}
        for expert, arrays in fresh.items():
            slot = self.pool.claim(keep)
            if slot is None:
                break
            for name, value in arrays.items():
                self.arrays[name][slot] = value
            slot_of[key(expert)] = slot
        self._sync_lut([e for e in wanted if key(e) in slot_of])


@dataclass(frozen=True)
class DeferredCall:
    """A decode call routed on the device: its ids and whether the bank held all of them."""

    bank: LayerExpertBank
    indices: mx.array
    held: mx.array


def sum_phases(counts: list[PhaseCounts]) -> PhaseCounts:
    return PhaseCounts(
        sum(c.calls for c in counts),
        sum(c.hits for c in counts),
        sum(c.misses for c in counts),
        sum(c.bytes_read for c in counts),
    )


def parse_size(value: int | str, what: str = "expert budget") -> int:
    """Bytes from an int or a size string such as ``"2GB"``, ``"512MiB"`` or ``"1.5G"``.

    ``what`` names the setting in the error message.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionsError(f"{what} must be bytes or a size string, got {value!r}")
    size: float
    if isinstance(value, int):
        size = value
    else:
        text = value.strip().upper().replace(" ", "")
        units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6,
                 "MIB": 2**20, "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12,
                 "TIB": 2**40}  # fmt: skip
        number = text.rstrip("KMGTIB")
        unit = text[len(number) :]
        try:
            size = float(number) * units[unit]
        except (ValueError, KeyError):
            raise OptionsError(
                f"{what} {value!r} is not a size; use bytes or e.g. '2GB', '512MiB'"
            ) from None
    if not size >= 1:
        raise OptionsError(f"{what} must be at least one byte, got {value!r}")
    return int(size)


def check_budget(
    budget: int,
    sources: Mapping[str, LayerSource],
    float_dtype: mx.Dtype | None = None,
    slot_pool: SlotPoolMode = "layer",
) -> int:
    """Slots that ``budget`` buys, or ``BudgetError``: per layer (at most every expert of a
    layer), or for a shared pool in all (at most every expert of every layer)."""
    top_k = max((s.spec.top_k for s in sources.values()), default=1)
    if slot_pool == "shared":
        per_slot = max((slot_bytes(s, float_dtype) for s in sources.values()), default=0)
        slots = budget // per_slot if per_slot else 0
        where, cap = "in the shared pool", sum(s.spec.num_experts for s in sources.values())
    else:
        per_slot = sum(slot_bytes(s, float_dtype) for s in sources.values())
        slots = slots_for(budget, sources, float_dtype)
        where, cap = "per layer", max((s.spec.num_experts for s in sources.values()), default=1)
    if slots < top_k:
        need = per_slot * top_k
        raise BudgetError(
            f"expert budget {budget:,} bytes holds {slots} expert(s) {where}, but each token "
            f"routes to {top_k}; give at least {need:,} bytes (--expert-budget {need})"
        )
    return min(slots, max(cap, 1))


def check_shared_pool(sources: Mapping[str, LayerSource]) -> None:
    """A shared pool holds any layer's expert in any slot: every layer's must look alike."""
    items = iter(sources.items())
    first = next(items, None)
    if first is None:
        return
    shape = {name: (p.dtype, p.shape) for name, p in first[1].pieces.items()}
    for prefix, source in items:
        if {name: (p.dtype, p.shape) for name, p in source.pieces.items()} != shape:
            raise OptionsError(
                f"slot_pool='shared' holds every MoE layer's experts in one pool, and the "
                f"experts of {prefix} differ in shape or format from those of {first[0]}; use "
                "per-layer banks (slot_pool='layer')"
            )


class BankCache(ExpertStore):
    """Streaming expert store: one ``LayerExpertBank`` per MoE layer within a byte budget.

    ``slot_pool="layer"`` gives each layer its own slots (the budget split evenly);
    ``"shared"`` gives every layer one pool, least recently used across layers, so layers whose
    routing spreads wider take more of it, and the smallest budget is one layer's top-k.

    ``float_dtype`` (``bf16_streaming``: ``mx.bfloat16``) is the dtype float experts take in
    the banks, whatever their stored precision; quantized experts keep their format.
    """

    def __init__(
        self,
        sources: Mapping[str, LayerSource],
        budget: int,
        reader: ExpertReader | None = None,
        prefill: PrefillMode = "transient",
        float_dtype: mx.Dtype | None = None,
        kind: str = "streaming",
        slot_pool: SlotPoolMode = "layer",
    ) -> None:
        self.kind = kind
        self.reader = reader or ExpertReader()
        self.budget = budget
        self.slot_pool = slot_pool
        sizes = [slot_bytes(s, float_dtype) for s in sources.values()]
        self.slot_bytes = max(sizes, default=0) if slot_pool == "shared" else sum(sizes)
        self.slots = check_budget(budget, sources, float_dtype, slot_pool)
        self.layers: dict[str, LayerExpertBank] = {}
        # Each bank checks that a shared pool fits its experts (check_shared_pool says the same
        # at planning, before anything is allocated).
        shared: SlotPool | None = None
        for p, s in sources.items():
            slots = shared or (self.slots if slot_pool == "shared"
                               else min(self.slots, s.spec.num_experts))  # fmt: skip
            bank = LayerExpertBank(s, slots, self.reader, prefill, float_dtype)
            self.layers[p] = bank
            if slot_pool == "shared":
                shared = bank.pool
        self.pools = list({id(b.pool): b.pool for b in self.layers.values()}.values())
        self.expert_bytes = sum(s.expert_bytes * s.spec.num_experts for s in sources.values())
        self.decode_reads = DecodeReads()

    def layer(self, prefix: str) -> LayerExperts:
        return self.layers[prefix]

    @property
    def bytes_read(self) -> int:
        return self.reader.stats.bytes

    def record_decode_step(self, batch: int, tokens: int, nbytes: int) -> None:
        self.decode_reads.record(batch, tokens, nbytes)

    @property
    def nbytes(self) -> int:
        return sum(pool.nbytes for pool in self.pools)

    def stats(self) -> dict[str, Any]:
        hits = sum(b.hits for b in self.layers.values())
        misses = sum(b.misses for b in self.layers.values())
        read = self.reader.stats
        return {
            "kind": self.kind,
            "layers": len(self.layers),
            "slot_pool": self.slot_pool,
            "slots_per_layer": None if self.slot_pool == "shared" else self.slots,
            "slots": sum(pool.slots for pool in self.pools),
            "bytes_per_slot": self.slot_bytes,
            "budget_bytes": self.budget,
            "bytes_resident": self.nbytes,
            "expert_bytes_on_disk": self.expert_bytes,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "evictions": sum(pool.evictions for pool in self.pools),
            "transient_calls": sum(b.transient_calls for b in self.layers.values()),
            "bytes_read": read.bytes,
            "read_seconds": read.seconds,
            "read_gbps": read.bytes / read.seconds / 1e9 if read.seconds else 0.0,
            "decode_reads_by_batch": self.decode_reads.report(),
            **{
                phase: sum_phases([b.phases[phase] for b in self.layers.values()]).report()
                for phase in ("prefill", "decode")
            },
        }

    def close(self) -> None:
        self.reader.close()


def slot_bytes(source: LayerSource, float_dtype: mx.Dtype | None = None) -> int:
    """Bytes one expert of ``source`` takes in a bank."""
    total = 0
    for piece in source.pieces.values():
        quantized = f"{piece.part.split('.')[0]}.scales" in source.pieces
        total += int(np.prod(piece.shape)) * _bank_dtype(piece, quantized, float_dtype).size
    return total


def slots_for(
    budget: int, sources: Mapping[str, LayerSource], float_dtype: mx.Dtype | None = None
) -> int:
    """How many expert slots per layer a byte budget buys."""
    per_slot = sum(slot_bytes(s, float_dtype) for s in sources.values())
    return budget // per_slot if per_slot else 0
