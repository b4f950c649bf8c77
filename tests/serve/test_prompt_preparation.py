"""Templating and tokenizing happen off the event loop, behind caps checked before them."""

from __future__ import annotations

import json
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mach.default_model import default_model_path
from tests.serve.conftest import Running, serve_with
from tests.serve.raw import call, read_response, send, wait_until

CHAT = "/v1/chat/completions"
# About 800,000 tokens: seconds of tokenizing and hundreds of megabytes while it lasts.
BIG_TEXT = "def f(x):\n    return x + 1\n" * 70_000
# max_tokens over the room left fails after tokenizing, so nothing is ever generated.
BIG = {"messages": [{"role": "user", "content": BIG_TEXT}], "max_tokens": 10**7}


def error(response: httpx.Response, status: int = 400) -> dict[str, object]:
    assert response.status_code == status, response.text
    return response.json()["error"]  # type: ignore[no-any-return]


def rss_mib() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        return 0.0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def long_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, float]]:
    """The default model with a million-token context, so a huge prompt is tokenized whole.

    Also the process's memory (MiB) once it serves, before any big request.
    """
    root = tmp_path_factory.mktemp("long") / "long-context"
    root.mkdir()
    for file in default_model_path().iterdir():
        if file.name != "config.json":
            (root / file.name).symlink_to(file)
    config = json.loads((default_model_path() / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2**20}))
    for running in serve_with(model=str(root), max_prompt_bytes=4 * 2**20):
        body = {"prompt": "x = ", "max_tokens": 2}
        assert httpx.post(f"{running.url}/v1/completions", json=body, timeout=30).is_success
        yield running, rss_mib()


def test_health_answers_while_a_long_prompt_is_tokenized(
    long_context: tuple[Running, float],
) -> None:
    served = long_context[0]
    with send(served.port, "POST", CHAT, BIG) as big:
        time.sleep(0.2)  # the body is in; tokenizing it takes far longer than this
        status, _, body = call(served.port, "GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert select.select([big], [], [], 0)[0] == [], "the big request finished first"
        status, _, body = read_response(big)
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_returns_to_its_level_after_big_prompts(long_context: tuple[Running, float]) -> None:
    served, before = long_context
    for _ in range(2):
        response = httpx.post(f"{served.url}{CHAT}", json=BIG, timeout=120)
        assert error(response)["param"] == "max_tokens"
    # Without handing memory back this stays ~300 MiB up; a first big prompt leaves ~50 MiB
    # of the tokenizer's and the allocator's own for good.
    wait_until(lambda: rss_mib() < before + 96, f"memory is back near {before:.0f} MiB")


@pytest.fixture(scope="module")
def capped() -> Iterator[Running]:
    yield from serve_with(max_prompt_bytes=4096, max_prompt_tokens=64)


@pytest.mark.parametrize(
    ("path", "body", "param", "flag"),
    [(CHAT, {"messages": [{"role": "user", "content": "é" * 2100}]}, "messages", "bytes"),
     (CHAT, {"messages": [{"role": "user", "content": "hi"}],
             "tools": [{"type": "function", "function": {"name": "f", "description": "x" * 5000}}]},
      "messages", "bytes"),
     ("/v1/completions", {"prompt": "x" * 4097}, "prompt", "bytes"),
     ("/v1/completions", {"prompt": [5] * 65}, "prompt", "tokens"),
     ("/v1/completions", {"prompt": "x = 1\n" * 100}, "prompt", "tokens"),
     (CHAT, {"messages": [{"role": "user", "content": "x = 1\n" * 100}]}, "messages", "tokens")],
)  # fmt: skip
def test_prompts_over_a_cap_are_refused(capped: Running, path: str, body: dict[str, object],
                                        param: str, flag: str) -> None:  # fmt: skip
    found = error(httpx.post(f"{capped.url}{path}", json=body, timeout=30))
    assert found["code"] == "prompt_too_long" and found["param"] == param
    assert f"--max-prompt-{flag}" in str(found["message"])


def test_a_prompt_at_the_token_cap_is_served(capped: Running) -> None:
    body = {"prompt": [5] * 64, "max_tokens": 1}
    assert httpx.post(f"{capped.url}/v1/completions", json=body, timeout=30).status_code == 200


def test_a_prompt_far_over_the_context_is_refused_early(served: Running) -> None:
    text = "x = 1\n" * 150_000  # under the byte cap, a hundred times the context
    found = error(httpx.post(f"{served.url}/v1/completions", json={"prompt": text}, timeout=30))
    assert found["code"] == "context_length_exceeded" and found["param"] == "prompt"
    limit = served.state.context_length - 1
    assert f"more than {limit} tokens" in str(found["message"])
