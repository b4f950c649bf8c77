"""32 concurrent streaming clients, some hanging up early: nothing lost, duplicated or changed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.serve.conftest import Running

CLIENTS = 32
PROMPTS = ["def parse(text):", "class Cache:", "import sys\n", "for item in items:"]


async def stream_text(client: httpx.AsyncClient, url: str, prompt: str, hang_up: bool) -> dict:  # type: ignore[type-arg]
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
    text, ids, done, chunks = [], set(), False, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            payload = json.loads(line[6:])
            ids.add(payload["id"])
            text.append("".join(c["text"] for c in payload["choices"]))
            chunks += 1
            if hang_up and chunks == 2:
                break
    return {"text": "".join(text), "ids": ids, "done": done}


async def run_all(url: str) -> tuple[list[dict], dict[str, str]]:  # type: ignore[type-arg]
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        alone = {}
        for prompt in PROMPTS:
            alone[prompt] = (await stream_text(client, url, prompt, False))["text"]
        jobs = [stream_text(client, url, PROMPTS[i % 4], hang_up=i % 5 == 4)
                for i in range(CLIENTS)]  # fmt: skip
        return list(await asyncio.gather(*jobs)), alone


def test_concurrent_streams(served: Running) -> None:
    before = served.state.metrics.cancelled
    results, alone = asyncio.run(run_all(served.url))
    survivors = [r for i, r in enumerate(results) if i % 5 != 4]
    for i, result in enumerate(results):
        if i % 5 == 4:
            continue
        assert result["done"], f"request {i} never finished"
        assert result["text"] == alone[PROMPTS[i % 4]], f"request {i} changed under load"
    ids = [next(iter(r["ids"])) for r in results if r["ids"]]
    assert len(ids) == len(set(ids)) == CLIENTS
    assert all(len(r["ids"]) == 1 for r in survivors)
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok"
    deadline = time.time() + 10
    while served.state.worker.depth and time.time() < deadline:
        time.sleep(0.05)
    assert served.state.worker.depth == 0
    assert served.state.metrics.cancelled > before
    metrics = httpx.get(f"{served.url}/metrics").text
    assert "mach_cancelled_requests_total" in metrics and "mach_queue_depth 0" in metrics
