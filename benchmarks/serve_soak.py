"""Soak `mach serve` on loopback with a mix of polite, impatient and malformed clients.

Starts `mach serve` (the embedded default model unless ``--model``) as its own process, then
runs ``--clients`` concurrent clients for ``--seconds``. Each client loops over requests drawn
at random: streaming and non-streaming completions that run to the end, streams the client
hangs up after a few chunks, non-streaming requests it abandons after a short timeout,
malformed requests (bad JSON, invalid UTF-8, deep nesting, out-of-range seeds, a wrong
content type or Host, unknown routes) and prompts far over the context. A separate thread
polls ``/health`` throughout. Prints what the clients saw, what the server counted, the
``/health`` latency percentiles and the server's resident memory before and after.

    uv run python -m benchmarks.serve_soak --clients 16 --seconds 60

Outcomes, as the clients count them: completed (a full 200 answer), cancelled (the client
left on purpose), rejected (a 4xx for a malformed request, or a 503 when the queue is full)
and errors (anything else: a 5xx, a malformed request that was accepted, a broken stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

import httpx

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPTS = ["def parse(text):", "class Cache:", "import sys\n", "for item in items:"]
MALFORMED: list[tuple[str, bytes, dict[str, str]]] = [
    (CHAT, b"{not json", {}),
    (CHAT, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', {}),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', {}),
    (CHAT, b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", {}),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "seed": -1}', {}),
    (COMPLETIONS, b'{"prompt": "x", "seed": 18446744073709551616}', {}),
    (COMPLETIONS, b'{"prompt": "x"}', {"content-type": "text/plain"}),
    (COMPLETIONS, b'{"prompt": "x"}', {"host": "attacker.example"}),
    ("/v1/nothing", b"{}", {}),
]
KINDS = {"stream": 3, "complete": 3, "hang_up": 2, "abandon": 2, "malformed": 3, "too_long": 1}


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) / 1024


def start_server(model: str | None, port: int, log: IO[str]) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "mach", "serve", "--port", str(port), "--shutdown-grace", "5"]
    proc = subprocess.Popen([*args, *([model] if model else [])], stdout=subprocess.DEVNULL,
                            stderr=log, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(log.read()) from None
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def completion(rng: random.Random, stream: bool, max_tokens: int) -> dict[str, object]:
    return {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "stream": stream,
            "temperature": rng.choice([0, 0.8]), "seed": rng.randrange(2**32)}  # fmt: skip


async def one_request(client: httpx.AsyncClient, rng: random.Random, kind: str) -> str:
    if kind == "stream":
        body = completion(rng, True, rng.randint(8, 48))
        async with client.stream("POST", COMPLETIONS, json=body) as response:
            if response.status_code == 503:
                return "rejected"
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        done = response.status_code == 200 and lines and lines[-1] == "data: [DONE]"
        return "completed" if done and '"error"' not in lines[-2] else "errors"
    if kind == "complete":
        body = completion(rng, False, rng.randint(8, 48))
        if rng.random() < 0.5:
            path = COMPLETIONS
        else:
            path, prompt = CHAT, body.pop("prompt")
            body["messages"] = [{"role": "user", "content": prompt}]
        response = await client.post(path, json=body)
        return {200: "completed", 503: "rejected"}.get(response.status_code, "errors")
    if kind == "hang_up":
        body = completion(rng, True, 400)
        async with client.stream("POST", COMPLETIONS, json=body) as response:
            if response.status_code == 503:
                return "rejected"
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks >= rng.randint(1, 4):
                    break
        return "cancelled"
    if kind == "abandon":
        try:
            response = await client.post(COMPLETIONS, json=completion(rng, False, 400),
                                         timeout=rng.uniform(0.1, 1.0))  # fmt: skip
        except httpx.TimeoutException:
            return "cancelled"
        return {200: "completed", 503: "rejected"}.get(response.status_code, "errors")
    if kind == "too_long":
        body = {"prompt": "x = 1\n" * 150_000}
        response = await client.post(COMPLETIONS, json=body)
        return "rejected" if response.status_code == 400 else "errors"
    path, data, headers = rng.choice(MALFORMED)
    headers = {"content-type": "application/json", **headers}
    response = await client.post(path, content=data, headers=headers)
    return "rejected" if 400 <= response.status_code < 500 else "errors"


async def run_client(url: str, seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    names, weights = list(KINDS), list(KINDS.values())
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < stop_at:
            kind = rng.choices(names, weights)[0]
            tally.kinds[kind] += 1
            try:
                outcome = await one_request(client, rng, kind)
            except httpx.HTTPError as exc:
                outcome = "errors"
                tally.failures[f"{kind}: {type(exc).__name__}"] += 1
            else:
                if outcome == "errors":
                    tally.failures[kind] += 1
            tally.outcomes[outcome] += 1
            tally.by_kind[f"{kind} {outcome}"] += 1


def probe_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append((time.perf_counter() - start) * 1000)
            stop.wait(0.05)


def server_counts(url: str) -> dict[str, int]:
    counts = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("mach_") and name.endswith("_requests_total"):
            counts[name.removeprefix("mach_").removesuffix("_requests_total")] = int(value)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read after the server has exited
    proc = start_server(args.model, port, log)
    try:
        httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "x", "max_tokens": 4}, timeout=60)
        before = rss_mib(proc.pid)
        tally, latencies, stop = Tally(), [], threading.Event()
        prober = threading.Thread(target=probe_health, args=(url, stop, latencies))
        prober.start()
        stop_at = time.monotonic() + args.seconds
        start = time.monotonic()

        async def everyone() -> None:
            await asyncio.gather(*(run_client(url, args.seed + i, stop_at, tally)
                                   for i in range(args.clients)))  # fmt: skip

        asyncio.run(everyone())
        elapsed = time.monotonic() - start
        stop.set()
        prober.join()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        after = rss_mib(proc.pid)
        server = server_counts(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    log.seek(0)
    logged = [line.rstrip() for line in log if line.startswith(("ERROR", "Traceback"))]
    sent = sum(tally.kinds.values())
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(f"{args.clients} clients for {elapsed:.0f} s on {os.cpu_count()} cores; "
          f"requests by kind: {dict(tally.kinds)}")  # fmt: skip
    print()
    print(
        "| requests | completed | cancelled | rejected | errors | /health p50 | /health p99 "
        "| RSS before | RSS after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {sent} | {tally.outcomes['completed']} | {tally.outcomes['cancelled']} "
          f"| {tally.outcomes['rejected']} | {tally.outcomes['errors']} "
          f"| {statistics.median(ordered):.1f} ms | {p99:.1f} ms "
          f"| {before:.0f} MiB | {after:.0f} MiB |")  # fmt: skip
    print()
    print("server's counts (/metrics):", json.dumps(server))
    print("clients' outcomes by kind:", dict(sorted(tally.by_kind.items())))
    print(f"errors in the server's log: {len(logged)}")
    if tally.failures:
        print("errors by kind:", dict(tally.failures))


if __name__ == "__main__":
    main()
