"""A real uvicorn server on a loopback port, serving the embedded default model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from mach_serve import build_state, create_app
from mach_serve.state import ServerState


@dataclass
class Running:
    url: str
    state: ServerState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(state: ServerState, **app_options: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    config = uvicorn.Config(create_app(state, **app_options), host="127.0.0.1", port=port,
                            log_level="warning", timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def served() -> Iterator[Running]:
    state = build_state(None, max_queue=64)
    server, thread, url = start(state)
    yield Running(url, state)
    server.should_exit = True
    thread.join(10)


def serve_with(**options: Any) -> Iterator[Running]:
    app_options = {k: options.pop(k) for k in ("cors_origins",) if k in options}
    state = build_state(options.pop("model", None), **options)
    server, thread, url = start(state, **app_options)
    try:
        yield Running(url, state)
    finally:
        server.should_exit = True
        thread.join(10)
