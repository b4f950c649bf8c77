"""A client that leaves stops its work: running or queued, streaming or not."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.serve.conftest import Running, serve_with
from tests.serve.raw import read_response, request_bytes, send, wait_until

# Far more tokens than any test waits for: only cancelling ends such a job early.
LONG = {"prompt": "def parse(text):", "max_tokens": 1500, "temperature": 0}


@pytest.fixture(scope="module")
def fresh() -> Iterator[Running]:
    yield from serve_with()


@pytest.fixture(scope="module")
def one_at_a_time() -> Iterator[Running]:
    """A server whose requests queue behind the running one instead of batching."""
    yield from serve_with(max_batch=1)


def outcomes(served: Running) -> dict[str, int]:
    return dict(served.state.metrics.outcomes)


def test_a_non_streaming_client_that_leaves_stops_its_generation(fresh: Running) -> None:
    worker, before = fresh.state.worker, outcomes(fresh)
    generated = worker.generated
    sock = send(fresh.port, "POST", "/v1/completions", LONG)
    wait_until(lambda: worker.generated > generated + 4, "the job is generating")
    sock.close()
    wait_until(lambda: worker.depth == 0, "the worker is idle again")
    assert worker.generated - generated < LONG["max_tokens"]
    reply = httpx.post(f"{fresh.url}/v1/completions", timeout=30,
                       json={"prompt": "x = ", "max_tokens": 3})  # fmt: skip
    assert reply.status_code == 200
    after = outcomes(fresh)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after.get("completed", 0) == before.get("completed", 0) + 1
    assert after.get("failed", 0) == before.get("failed", 0)
    metrics = httpx.get(f"{fresh.url}/metrics").text
    assert f"mach_cancelled_requests_total {after['cancelled']}" in metrics
    assert f"mach_completed_requests_total {after['completed']}" in metrics


@pytest.mark.parametrize("stream", [False, True])
def test_queued_requests_whose_client_left_never_start(one_at_a_time: Running,
                                                       stream: bool) -> None:  # fmt: skip
    fresh = one_at_a_time
    worker, cancelled = fresh.state.worker, fresh.state.metrics.cancelled
    started = worker.started
    running = send(fresh.port, "POST", "/v1/completions", {**LONG, "stream": True})
    assert read_response(running)[0] == 200  # a stream's head comes with its first token
    queued = [send(fresh.port, "POST", "/v1/completions", {**LONG, "stream": stream})
              for _ in range(3)]  # fmt: skip
    wait_until(lambda: worker.depth == 4, "three requests wait behind the running one")
    for sock in queued:
        sock.close()
    wait_until(lambda: fresh.state.metrics.cancelled == cancelled + 3, "the departures are seen")
    running.close()
    wait_until(lambda: worker.depth == 0, "the worker is idle again")
    assert worker.started == started + 1
    assert fresh.state.metrics.cancelled == cancelled + 4


def test_a_streaming_client_that_leaves_is_counted_cancelled(fresh: Running) -> None:
    before = outcomes(fresh)
    with httpx.stream("POST", f"{fresh.url}/v1/completions", timeout=30,
                      json={**LONG, "stream": True}) as response:  # fmt: skip
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    wait_until(lambda: fresh.state.worker.depth == 0, "the worker is idle again")
    after = outcomes(fresh)
    assert after["cancelled"] == before.get("cancelled", 0) + 1
    assert after.get("failed", 0) == before.get("failed", 0)


def test_a_client_that_leaves_while_sending_its_body_is_counted_cancelled(fresh: Running) -> None:
    metrics = fresh.state.metrics
    cancelled, gone = metrics.cancelled, metrics.requests[("completions", 499)]
    head = request_bytes("POST", "/v1/completions", b"", port=fresh.port)
    with socket.create_connection(("127.0.0.1", fresh.port)) as sock:
        sock.sendall(head.replace(b"Content-Length: 0", b"Content-Length: 100") + b'{"pro')
    wait_until(lambda: metrics.cancelled == cancelled + 1, "the departure is counted")
    assert metrics.requests[("completions", 499)] == gone + 1
    assert not any(status == 500 for _, status in metrics.requests)
