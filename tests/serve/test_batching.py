"""Continuous batching behind the OpenAI API: concurrent clients share decode steps and each
gets what it would get alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.io.options import LoadOptions
from tests.serve.conftest import Running, serve_with
from tests.serve.raw import wait_until

PROMPTS = ["def add(a, b):", "import os\n", "class Parser:\n    def", "for i in range("]


@pytest.fixture(scope="module")
def batched() -> Iterator[Running]:
    yield from serve_with(max_batch=4)


def client(served: Running) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def alone(served: Running, prompt: str, params: SamplingParams) -> str:
    """What the served model gives ``prompt`` decoded by itself (the worker being idle)."""
    engine = served.state.worker.engine
    assert isinstance(engine, ContinuousBatchScheduler)
    single = TargetEngine(engine.model, served.state.tokenizer, engine.make_cache)
    return single.generate(served.state.tokenizer.encode(prompt), params).text


def test_capabilities_report_batching(batched: Running) -> None:
    server = httpx.get(f"{batched.url}/v1/capabilities").json()["server"]
    assert server["continuous_batching"] is True and server["max_batch"] == 4
    assert server["sequential_reason"] is None
    assert server["decode_passes"] == {"compiled": True, "reason": None}
    checkpoint = httpx.get(f"{batched.url}/v1/capabilities").json()["checkpoint"]
    assert checkpoint["continuous_batching"] is True


def test_one_at_a_time_is_reported_with_its_reason() -> None:
    for served in serve_with(max_batch=1):
        server = httpx.get(f"{served.url}/v1/capabilities").json()["server"]
        assert server["continuous_batching"] is False and server["max_batch"] == 1
        assert server["sequential_reason"] == "--max-batch is 1"
        assert server["decode_passes"] == {"compiled": True, "reason": None}


def test_concurrent_streams_share_the_batch_and_match_sequential_runs(batched: Running) -> None:
    engine = batched.state.worker.engine
    assert isinstance(engine, ContinuousBatchScheduler)
    api, widest = client(batched), [0]
    texts: dict[int, str] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            widest[0] = max(widest[0], engine.batch_size)
            time.sleep(0.002)

    def run(i: int) -> None:
        parts = []
        request = {"prompt": PROMPTS[i], "max_tokens": 160, "temperature": 0}
        for chunk in api.completions.create(model=batched.state.model_id, stream=True, **request):
            parts.extend(c.text for c in chunk.choices)
        texts[i] = "".join(parts)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    watcher.join()
    assert widest[0] >= 2, "the requests never decoded together"
    params = SamplingParams(max_tokens=160, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        assert texts[i] == alone(batched, prompt, params), i


def test_mixed_settings_in_one_batch(batched: Running) -> None:
    api = client(batched)
    requests: list[dict[str, Any]] = [
        {"prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "logprobs": 2},
        {"prompt": PROMPTS[1], "max_tokens": 25, "temperature": 0.8, "top_p": 0.9, "seed": 5},
        {"prompt": PROMPTS[2], "max_tokens": 40, "temperature": 0, "stop": ["\n"]},
        {"prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0},
    ]
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        results[i] = api.completions.create(model=batched.state.model_id, **requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, request in enumerate(requests):
        params = SamplingParams(max_tokens=request["max_tokens"],
                                temperature=float(request["temperature"]),
                                top_p=request.get("top_p", 1.0), seed=request.get("seed"),
                                stop=request.get("stop", []))  # fmt: skip
        assert results[i].choices[0].text == alone(batched, request["prompt"], params), i
    logprobs = results[0].choices[0].logprobs
    assert (
        logprobs is not None and len(logprobs.token_logprobs) == results[0].usage.completion_tokens
    )
    assert results[2].choices[0].finish_reason in ("stop", "length")
    assert "\n" not in results[2].choices[0].text


def test_a_client_that_leaves_mid_batch_leaves_the_others_running(batched: Running) -> None:
    engine = batched.state.worker.engine
    assert isinstance(engine, ContinuousBatchScheduler)
    api, cancelled = client(batched), batched.state.metrics.cancelled
    generated = batched.state.worker.generated
    texts: dict[int, str] = {}
    leaving = httpx.stream("POST", f"{batched.url}/v1/completions", timeout=30,
                           json={"prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0,
                                 "stream": True})  # fmt: skip
    response = leaving.__enter__()
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")

    def run(i: int) -> None:
        out = api.completions.create(model=batched.state.model_id, prompt=PROMPTS[i],
                                     max_tokens=120, temperature=0)  # fmt: skip
        texts[i] = out.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    wait_until(lambda: engine.batch_size == 3, "three requests decode together")
    leaving.__exit__(None, None, None)
    wait_until(lambda: batched.state.metrics.cancelled == cancelled + 1, "the departure is seen")
    for t in threads:
        t.join(60)
    wait_until(lambda: batched.state.worker.depth == 0, "the worker is idle again")
    assert batched.state.worker.generated - generated < 1500
    params = SamplingParams(max_tokens=120, temperature=0.0)
    for i in (1, 2):
        assert texts[i] == alone(batched, PROMPTS[i], params), i


@pytest.fixture(scope="module")
def streamed() -> Iterator[Running]:
    yield from serve_with(max_batch=4, options=LoadOptions(streaming=True))


def test_streaming_metrics_report_expert_reads_by_batch_size(streamed: Running) -> None:
    api, used = client(streamed), []

    def run(prompt: str) -> None:
        out = api.completions.create(model=streamed.state.model_id, prompt=prompt,
                                     max_tokens=40, temperature=0)  # fmt: skip
        assert out.usage is not None
        used.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    reads = streamed.state.store.stats()["decode_reads_by_batch"]
    assert len(used) == 4 and sum(r["tokens"] for r in reads.values()) == sum(used)
    assert any(int(b) > 1 for b in reads)
    metrics = httpx.get(f"{streamed.url}/metrics").text
    for b, r in reads.items():
        assert f'mach_decode_tokens_total{{batch="{b}"}} {r["tokens"]}' in metrics
        assert f'mach_expert_decode_bytes_read_total{{batch="{b}"}} {r["bytes_read"]}' in metrics
    stats = streamed.state.store.stats()
    assert f"mach_expert_slots_per_layer {stats['slots_per_layer']}" in metrics
    assert stats["decode"]["calls"] > 0
    for phase in ("prefill", "decode"):
        counts = stats[phase]
        assert counts["hits"] + counts["misses"] >= counts["calls"]
        for name in ("calls", "hits", "misses"):
            assert (
                f"mach_expert_{'layer_' if name == 'calls' else ''}{name}_total"
                f'{{phase="{phase}"}} {counts[name]}' in metrics
            )


def test_shutdown_gives_the_whole_batch_its_grace_then_ends_each_stream() -> None:
    import json
    import signal

    from mach_serve.limits import HTTPLimits
    from tests.serve.raw import read_all, read_response, send

    for served in serve_with(max_batch=4, limits=HTTPLimits(shutdown_grace=1)):
        body = {"prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "stream": True}
        socks = [send(served.port, "POST", "/v1/completions", body) for _ in range(2)]
        for sock in socks:
            assert read_response(sock)[0] == 200
        served.server.handle_exit(signal.SIGTERM, None)
        for sock in socks:
            events = [
                line[6:] for line in read_all(sock).split(b"\n") if line.startswith(b"data: ")
            ]
            sock.close()
            assert events[-1].strip() == b"[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "shutting_down"
        assert served.state.metrics.outcomes["failed"] == 2


@pytest.fixture(scope="module")
def quantized() -> Iterator[Running]:
    yield from serve_with(max_batch=4, options=LoadOptions(kv_bits=3))


def test_turboquant_kv_batches_behind_the_api(quantized: Running) -> None:
    """``--kv-bits 3``: concurrent requests share decode steps over TurboQuant caches, and
    each gets the text it would get alone with the same caches."""
    server = httpx.get(f"{quantized.url}/v1/capabilities").json()["server"]
    assert server["continuous_batching"] is True and server["sequential_reason"] is None
    api, texts = client(quantized), {}

    def run(i: int) -> None:
        reply = api.completions.create(model=quantized.state.model_id, prompt=PROMPTS[i],
                                       max_tokens=48, temperature=0)  # fmt: skip
        texts[i] = reply.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        assert texts[i] == alone(quantized, prompt, params), i
