"""What the server holds: the loaded model, its worker and its counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mach.adapter import MoeArchAdapter
from mach.experts.store import ExpertStore
from mach.tokenizer.tokenizer import Tokenizer
from mach_serve.metrics import Metrics
from mach_serve.worker import ModelWorker


@dataclass
class ServerState:
    model_id: str
    tokenizer: Tokenizer
    adapter: MoeArchAdapter
    store: ExpertStore
    worker: ModelWorker
    context_length: int
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """``mach check``'s report for the served checkpoint."""
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)

    def store_stats(self) -> dict[str, Any]:
        return self.store.stats()
