"""`mach serve` as a process: the plugin adds the command, it serves, SIGTERM drains it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.serve.conftest import free_port
from tests.serve.raw import read_all, read_response, send
from tests.serve.test_shutdown import LONG, events


def test_serve_is_added_by_the_plugin() -> None:
    result = subprocess.run([sys.executable, "-m", "mach", "serve", "--help"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert result.returncode == 0
    for flag in ("--api-key", "--allowed-host", "--max-prompt-bytes", "--max-prompt-tokens",
                 "--keep-alive-timeout", "--header-timeout", "--body-timeout",
                 "--max-header-bytes", "--limit-concurrency", "--shutdown-grace",
                 "--max-batch"):  # fmt: skip
        assert flag in result.stdout, flag


def test_max_batch_must_be_positive() -> None:
    result = subprocess.run([sys.executable, "-m", "mach", "serve", "--max-batch", "0"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert result.returncode == 2 and "--max-batch" in result.stderr


def test_serve_answers_and_stops_gracefully() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mach", "serve", "--port", str(port), "--model-name", "tiny",
         "--shutdown-grace", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                if time.time() > deadline or proc.poll() is not None:
                    output = proc.stderr.read() if proc.stderr else "no output"
                    raise AssertionError(output) from None
                time.sleep(0.2)
        assert health.json()["model"] == "tiny"
        caps = httpx.get(f"http://127.0.0.1:{port}/v1/capabilities").json()
        assert caps["arch"]["name"] == "qwen3_moe" and caps["arch"]["distribution"]
        assert caps["checkpoint"]["loads"] and caps["checkpoint"]["arch_summary"] == caps["arch"]
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"prompt": "import os", "max_tokens": 4})  # fmt: skip
        assert reply.status_code == 200
        running = send(port, "POST", "/v1/completions", {**LONG, "stream": True})
        assert read_response(running)[0] == 200
        queued = send(port, "POST", "/v1/completions", LONG)
        time.sleep(0.5)  # let the second request reach the queue
    finally:
        proc.send_signal(signal.SIGTERM)
    status, _, body = read_response(queued)
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
    stream = events(read_all(running))
    assert stream[-1] == b"[DONE]" and b"shutting_down" in stream[-2]
    _, err = proc.communicate(timeout=30)
    # uvicorn re-raises the signal after its graceful shutdown, so the status reports SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in err


def test_busy_port_fails_before_loading() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "mach", "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr
