"""Prompt prefixes reused across requests and restarts, reported as OpenAI reports them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.serve.conftest import Running, serve_with

SYSTEM = "You review Python code. Keep answers short.\n" + "".join(
    f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(24)
)


def _ask(running: Running, question: str) -> tuple[str, int, int]:
    client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=running.state.model_id,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=12,
        temperature=0,
    )
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    return reply.choices[0].message.content or "", usage.prompt_tokens, cached


@pytest.fixture
def uncached() -> Iterator[Running]:
    yield from serve_with(prompt_cache_bytes=None)


def test_second_request_reuses_the_prefix_and_answers_the_same(
    served: Running, uncached: Running
) -> None:
    first, prompt_tokens, cached_first = _ask(served, "What does helper_3 return?")
    again, _, cached_again = _ask(served, "What does helper_3 return?")
    other, _, cached_other = _ask(served, "What does helper_5 return?")
    assert prompt_tokens > 128
    assert cached_again >= 64 and cached_other >= 64
    assert cached_again > cached_first
    assert again == first
    reference, _, none_cached = _ask(uncached, "What does helper_5 return?")
    assert other == reference and none_cached == 0
    metrics = httpx.get(f"{served.url}/metrics").text
    hits = next(line for line in metrics.splitlines()
                if line.startswith("mach_prefix_cache_hits_total "))  # fmt: skip
    assert int(hits.split()[1]) >= 2
    caps = httpx.get(f"{served.url}/v1/capabilities").json()["server"]
    assert caps["prefix_cache"] is True
    assert httpx.get(f"{uncached.url}/v1/capabilities").json()["server"]["prefix_cache"] is False


def test_disk_tier_survives_a_restart(tmp_path: Path) -> None:
    for running in serve_with(prompt_cache_dir=str(tmp_path)):
        first, _, cached = _ask(running, "What does helper_7 return?")
        assert cached == 0
        assert running.state.prefix_stats()["l2_bytes"] > 0
    for running in serve_with(prompt_cache_dir=str(tmp_path)):
        again, _, cached = _ask(running, "What does helper_7 return?")
        assert cached >= 64 and again == first
        assert running.state.prefix_stats()["l2_hits"] == 1
        assert httpx.get(f"{running.url}/v1/capabilities").json()["server"]["prefix_cache_disk"]
