"""Counters the server exposes at ``/metrics`` in Prometheus text format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["completed", "cancelled", "failed", "rejected"]
OUTCOMES: dict[Outcome, str] = {
    "completed": "Generations that ran to their end and were delivered.",
    "cancelled": "Generations stopped, or never started, because the client disconnected.",
    "failed": "Generations ended by an error, the shutdown grace period included.",
    "rejected": "Requests refused before generating: queue full or shutting down.",
}


@dataclass
class Metrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    prompt_tokens: int = 0
    last_generation_tps: float = 0.0

    @property
    def cancelled(self) -> int:
        return self.outcomes["cancelled"]

    def render(
        self,
        queue_depth: int,
        generated: int,
        store: dict[str, Any],
        prefix: dict[str, Any] | None = None,
    ) -> str:
        lines = [
            "# HELP mach_requests_total Requests by endpoint and status.",
            "# TYPE mach_requests_total counter",
        ]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'mach_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
        rows = [
            ("mach_prompt_tokens_total", "counter", "Prompt tokens queued for generation.",
             self.prompt_tokens),
            ("mach_generated_tokens_total", "counter", "Tokens generated, cancelled work included.",
             generated),
            ("mach_generation_tokens_per_second", "gauge", "Decode rate of the last request.",
             self.last_generation_tps),
        ]  # fmt: skip
        rows += [(f"mach_{kind}_requests_total", "counter", text, self.outcomes[kind])
                 for kind, text in OUTCOMES.items()]  # fmt: skip
        rows += [
            ("mach_queue_depth", "gauge", "Requests waiting or running.", queue_depth),
            ("mach_expert_hit_rate", "gauge", "Expert bank hit rate (streaming stores).",
             store.get("hit_rate", 1.0)),
            ("mach_expert_bytes_read_total", "counter", "Expert bytes read from disk.",
             store.get("bytes_read", 0)),
        ]  # fmt: skip
        if prefix:
            rows += [
                ("mach_prefix_cache_hits_total", "counter",
                 "Requests that resumed a cached prefix.", prefix["hits"]),
                ("mach_prefix_cache_disk_hits_total", "counter",
                 "Cached prefixes found on disk (then kept in memory too).", prefix["l2_hits"]),
                ("mach_prefix_cache_misses_total", "counter", "Requests with no cached prefix.",
                 prefix["misses"]),
                ("mach_prefix_cache_tokens_reused_total", "counter",
                 "Prompt tokens restored instead of prefilled.", prefix["tokens_reused"]),
                ("mach_prefix_cache_memory_bytes", "gauge", "Bytes of snapshots in memory.",
                 prefix["l1_bytes"]),
                ("mach_prefix_cache_disk_bytes", "gauge", "Bytes of snapshots on disk.",
                 prefix["l2_bytes"]),
                ("mach_prefix_cache_evictions_total", "counter",
                 "Snapshots dropped to stay within a byte budget.", prefix["evictions"]),
            ]  # fmt: skip
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += _by_batch(store.get("decode_reads_by_batch", {}))
        lines += _by_phase(store, store.get("slots_per_layer"))
        return "\n".join(lines) + "\n"


def _by_phase(store: dict[str, Any], slots: int | None) -> list[str]:
    """Layer calls, distinct experts looked up and misses, for prefill and decode apart: the
    distinct experts a call needs, less the slots, is what it must read whatever the policy."""
    if "decode" not in store:
        return []
    lines = []
    if slots is not None:  # a shared pool has no per-layer count
        lines = [
            "# HELP mach_expert_slots_per_layer Expert slots in each layer's bank.",
            "# TYPE mach_expert_slots_per_layer gauge",
            f"mach_expert_slots_per_layer {slots}",
        ]
    for field_name, name, help_text in (
        ("calls", "mach_expert_layer_calls_total", "MoE layer calls through the banks."),
        ("hits", "mach_expert_hits_total", "Distinct experts a call found in its bank."),
        ("misses", "mach_expert_misses_total", "Distinct experts a call read from disk."),
    ):  # fmt: skip
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{phase="{p}"}} {store[p][field_name]}' for p in ("prefill", "decode")]
    return lines


def _by_batch(reads: dict[str, dict[str, Any]]) -> list[str]:
    """Decode steps, tokens and expert bytes read, labelled by the step's batch size."""
    lines = []
    for field_name, name, help_text in (
        ("steps", "mach_decode_steps_total", "Decode steps by batch size (streaming stores)."),
        ("tokens", "mach_decode_tokens_total", "Tokens decoded by batch size (streaming stores)."),
        ("bytes_read", "mach_expert_decode_bytes_read_total",
         "Expert bytes read by decode steps, by batch size."),
    ):  # fmt: skip
        if not reads:
            break
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{batch="{b}"}} {r[field_name]}' for b, r in reads.items()]
    return lines
