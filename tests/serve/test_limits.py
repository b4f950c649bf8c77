"""Slow, idle, oversized and too many connections are bounded by uvicorn's and h11's settings."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from mach_serve.limits import HTTPLimits
from tests.serve.conftest import Running, serve_with
from tests.serve.raw import call, read_all, read_response, request_bytes

LIMITS = HTTPLimits(keep_alive=1, header_timeout=0.5, max_header_bytes=4096, shutdown_grace=1)


@pytest.fixture(scope="module")
def strict() -> Iterator[Running]:
    yield from serve_with(limits=LIMITS, body_timeout=0.5)


def connect(served: Running) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.port), timeout=10)


def timed_out(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "timeout"


def test_a_half_sent_head_is_answered_408_and_closed(strict: Running) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert timed_out(read_all(sock))


def test_a_connection_that_sends_nothing_is_closed(strict: Running) -> None:
    with connect(strict) as sock:
        assert timed_out(read_all(sock))


def test_a_head_trickled_byte_by_byte_is_cut_off(strict: Running) -> None:
    head = request_bytes("GET", "/health", port=strict.port)
    with connect(strict) as sock:
        for byte in head[:-1]:  # a byte each 0.05 s: the whole head would take seconds
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        assert timed_out(read_all(sock))


def test_the_clock_restarts_for_each_request_on_a_connection(strict: Running) -> None:
    with connect(strict) as sock:
        for _ in range(3):  # together longer than one head's allowance
            time.sleep(0.3)
            sock.sendall(request_bytes("GET", "/health", port=strict.port))
            assert read_response(sock)[0] == 200


def test_an_oversized_head_is_refused(strict: Running) -> None:
    headers = {"X-Padding": "x" * LIMITS.max_header_bytes}
    head = request_bytes("GET", "/health", headers=headers, port=strict.port)
    with connect(strict) as sock:
        sock.sendall(head[:-4])  # h11 measures the head it is still waiting to complete
        assert read_all(sock).startswith(b"HTTP/1.1 400")


def test_a_slow_body_is_answered_408(strict: Running) -> None:
    head = request_bytes("POST", "/v1/completions", b"", port=strict.port)
    head = head.replace(b"Content-Length: 0", b"Content-Length: 100")
    with connect(strict) as sock:
        sock.sendall(head + b'{"prompt": ')
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "timeout"
        assert sock.recv(1) == b""


def test_an_idle_keep_alive_connection_is_closed(strict: Running) -> None:
    with connect(strict) as sock:
        sock.sendall(request_bytes("GET", "/health", port=strict.port))
        assert read_response(sock)[0] == 200
        assert sock.recv(1) == b""  # after keep_alive seconds, well within the socket timeout


@pytest.fixture(scope="module")
def few_connections() -> Iterator[Running]:
    yield from serve_with(limits=HTTPLimits(limit_concurrency=4, shutdown_grace=1))


def test_connections_beyond_the_limit_get_503(few_connections: Running) -> None:
    idle = [connect(few_connections) for _ in range(4)]
    try:
        time.sleep(0.1)  # let the server accept them
        assert call(few_connections.port, "GET", "/health")[0] == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.1)
    assert call(few_connections.port, "GET", "/health")[0] == 200
