"""A real uvicorn server on a loopback port, serving the embedded default model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mach_serve import build_state
from mach_serve.limits import HTTPLimits
from mach_serve.server import MachServer, make_server
from mach_serve.state import ServerState

SERVER_OPTIONS = ("cors_origins", "allowed_hosts", "limits")


@dataclass
class Running:
    url: str
    state: ServerState
    server: MachServer

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(state: ServerState, **server_options: Any) -> tuple[MachServer, threading.Thread, str]:
    port = free_port()
    server_options.setdefault("limits", HTTPLimits(shutdown_grace=2))
    server = make_server(state, "127.0.0.1", port, log_level="warning", **server_options)
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
    yield Running(url, state, server)
    server.should_exit = True
    thread.join(10)


def serve_with(**options: Any) -> Iterator[Running]:
    server_options = {k: options.pop(k) for k in SERVER_OPTIONS if k in options}
    state = build_state(options.pop("model", None), **options)
    server, thread, url = start(state, **server_options)
    try:
        yield Running(url, state, server)
    finally:
        server.should_exit = True
        thread.join(10)
