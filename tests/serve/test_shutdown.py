"""At SIGTERM: no new work, queued requests answered 503, the running one given its grace.

Requests queue here because the server decodes one at a time (``max_batch=1``).
"""

from __future__ import annotations

import json
import signal
import socket

from mach_serve.limits import HTTPLimits
from tests.serve.conftest import Running, serve_with
from tests.serve.raw import call, read_all, read_response, send, wait_until

LONG = {"prompt": "def parse(text):", "max_tokens": 1500, "temperature": 0}


def events(raw: bytes) -> list[bytes]:
    """The ``data:`` payloads of a chunked SSE body, in order."""
    return [line[6:].strip() for line in raw.split(b"\n") if line.startswith(b"data: ")]


def start_running(served: Running, max_tokens: int) -> socket.socket:
    sock = send(served.port, "POST", "/v1/completions",
                {**LONG, "max_tokens": max_tokens, "stream": True})  # fmt: skip
    assert read_response(sock)[0] == 200  # the head comes with the first token
    return sock


def queue_two(served: Running) -> list[socket.socket]:
    queued = [send(served.port, "POST", "/v1/completions", {**LONG, "stream": stream})
              for stream in (False, True)]  # fmt: skip
    wait_until(lambda: served.state.worker.depth == 3, "two requests wait")
    return queued


def test_queued_requests_get_503_and_a_stream_past_its_grace_ends_cleanly() -> None:
    for served in serve_with(limits=HTTPLimits(shutdown_grace=1), max_batch=1):
        running = start_running(served, LONG["max_tokens"])
        queued = queue_two(served)
        served.server.handle_exit(signal.SIGTERM, None)
        for sock in queued:
            status, _, body = read_response(sock)
            assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
            sock.close()
        stream = events(read_all(running))
        running.close()
        assert stream[-1] == b"[DONE]"
        assert json.loads(stream[-2])["error"]["code"] == "shutting_down"
        outcomes = served.state.metrics.outcomes
        assert (outcomes["rejected"], outcomes["failed"], outcomes["cancelled"]) == (2, 1, 0)
        assert served.state.worker.started == 1
        try:
            late = call(served.port, "POST", "/v1/completions", LONG)[0]
        except OSError:  # the listening socket is already closed
            late = None
        assert late in (None, 503)


def test_the_running_request_finishes_within_its_grace() -> None:
    for served in serve_with(limits=HTTPLimits(shutdown_grace=30), max_batch=1):
        running = start_running(served, 24)
        queued = queue_two(served)
        served.server.handle_exit(signal.SIGTERM, None)
        for sock in queued:
            assert read_response(sock)[0] == 503
            sock.close()
        stream = events(read_all(running))
        running.close()
        assert stream[-1] == b"[DONE]"
        finish = json.loads(stream[-2])["choices"][0]["finish_reason"]
        assert finish in ("length", "stop")
        assert served.state.metrics.outcomes["completed"] == 1
