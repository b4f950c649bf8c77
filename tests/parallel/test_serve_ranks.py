"""``mach serve`` under ``mlx.launch``: rank 0 serves HTTP, the other ranks follow its requests
in lockstep, and the answers are those of one process (official ``openai`` client)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

LAUNCH = Path(sys.executable).with_name("mlx.launch")
MODEL = "qwen3_moe-python-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(ranks: int, *flags: str) -> Iterator[str]:
    port = _free_port()
    serve = [sys.executable, "-m", "mach", "serve", "--port", str(port), *flags]
    if ranks == 1:  # the engine the ranks must use: one request at a time, no prompt cache
        command = [*serve, "--max-batch", "1", "--no-prompt-cache"]
    else:
        command = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", *serve]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                if time.time() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise AssertionError(proc.communicate()[0]) from None
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.fixture(scope="module")
def alone() -> Iterator[str]:
    yield from _serve(1)


@pytest.fixture(scope="module")
def shared() -> Iterator[str]:
    yield from _serve(2)


@pytest.fixture(scope="module")
def pipelined() -> Iterator[str]:
    yield from _serve(2, "--parallel", "pipeline")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _complete(url: str, **extra: object) -> str:
    reply = _client(url).completions.create(
        model=MODEL, prompt="def parse(path):", max_tokens=24, **extra
    )  # type: ignore[call-overload]
    return str(reply.choices[0].text)


def test_rank_0_answers_as_one_process(alone: str, shared: str) -> None:
    assert _complete(shared, temperature=0) == _complete(alone, temperature=0)
    # A seeded sample: every rank draws the same tokens, or rank 0's would not be these.
    seeded = {"temperature": 0.9, "seed": 7}
    assert _complete(shared, **seeded) == _complete(alone, **seeded)
    caps = httpx.get(f"{shared}/v1/capabilities").json()
    assert caps["checkpoint"]["parallel"]["ranks"] == 2
    assert caps["server"]["max_batch"] == 1 and caps["server"]["prefix_cache"] is False
    assert "expert parallelism over 2 ranks" in caps["server"]["sequential_reason"]
    assert caps["server"]["speculative_decoding"]["family"] == "specdec_v7"


def test_a_client_that_leaves_stops_every_rank_at_the_same_token(alone: str, shared: str) -> None:
    stream = _client(shared).completions.create(
        model=MODEL, prompt="class Node:", max_tokens=400, temperature=0.7, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # Unseeded too: rank 0 picked the seed and sent it. The ranks are still in step.
    _complete(shared, temperature=0.8)
    assert _complete(shared, temperature=0) == _complete(alone, temperature=0)


def test_pipeline_stages_serve_as_one_process(alone: str, pipelined: str) -> None:
    assert _complete(pipelined, temperature=0) == _complete(alone, temperature=0)
    seeded = {"temperature": 0.9, "seed": 11}
    assert _complete(pipelined, **seeded) == _complete(alone, **seeded)
    stream = _client(pipelined).completions.create(
        model=MODEL, prompt="import os", max_tokens=400, temperature=0.7, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert _complete(pipelined, temperature=0) == _complete(alone, temperature=0)
    caps = httpx.get(f"{pipelined}/v1/capabilities").json()
    parallel = caps["checkpoint"]["parallel"]
    assert parallel["ranks"] == 2 and parallel["mode"] == "pipeline"
    assert "pipeline parallelism over 2 ranks" in caps["server"]["sequential_reason"]
