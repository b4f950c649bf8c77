"""Connection timeouts and limits of the HTTP server (a module light enough for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HTTPLimits:
    """Connection timeouts and limits, each handed to uvicorn (or h11 through it)."""

    keep_alive: int = 5
    """Seconds an idle keep-alive connection stays open (uvicorn ``timeout_keep_alive``)."""
    header_timeout: float = 10.0
    """Seconds a request head may take to arrive (:mod:`mach_serve.protocol`)."""
    max_header_bytes: int = 16 * 2**10
    """Largest request head (h11's ``max_incomplete_event_size``); larger ones get 400."""
    limit_concurrency: int = 128
    """Connections and requests at once; beyond them uvicorn answers 503."""
    shutdown_grace: float = 30.0
    """Seconds the running request gets to finish after SIGTERM or SIGINT."""
