"""What the server holds: the loaded model, its worker, its limits and its counters."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mach.adapter import MoeArchAdapter
from mach.cache.prefix import PrefixCache
from mach.experts.store import ExpertStore
from mach.tokenizer.tokenizer import Tokenizer
from mach_serve.metrics import Metrics
from mach_serve.worker import ModelWorker

PREPARE_THREADS = 2


@dataclass
class ServerState:
    model_id: str
    tokenizer: Tokenizer
    adapter: MoeArchAdapter
    store: ExpertStore
    worker: ModelWorker
    context_length: int
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """``mach check``'s report for the served checkpoint, without filesystem paths."""
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    body_timeout: float = 30.0
    """Seconds a request body may take to arrive in full."""
    max_prompt_bytes: int = 2**20
    """UTF-8 bytes of prompt text (messages and tools), checked before templating."""
    max_prompt_tokens: int | None = None
    """Prompt tokens, checked before a request is queued; ``None``: the context decides."""
    prefix_cache: PrefixCache | None = None
    """Reused prompt prefixes (memory, and disk when a directory was given); ``None``: off."""
    sequential_reason: str | None = None
    decode_passes: dict[str, Any] = field(default_factory=dict)
    """``compile_report`` of the engine: whether its decode passes run compiled."""
    """Why requests decode one at a time instead of in batches; ``None``: they batch."""
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)
    prepare_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PREPARE_THREADS, "mach-prepare")
    )
    """Where templating and tokenizing run, off the event loop and beside the model worker."""

    def store_stats(self) -> dict[str, Any]:
        return self.store.stats()

    def prefix_stats(self) -> dict[str, Any]:
        return self.prefix_cache.stats() if self.prefix_cache is not None else {}
