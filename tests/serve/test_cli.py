"""`mach serve` as a process: the plugin adds the command, it serves, it shuts down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.serve.conftest import free_port


def test_serve_is_added_by_the_plugin() -> None:
    result = subprocess.run([sys.executable, "-m", "mach", "serve", "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--api-key" in result.stdout


def test_serve_answers_and_stops_gracefully() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mach", "serve", "--port", str(port), "--model-name", "tiny"],
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
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    # uvicorn re-raises the signal after its graceful shutdown, so the status reports SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in err
