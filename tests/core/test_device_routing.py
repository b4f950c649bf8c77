"""Device routing of streamed experts: steps whose experts the bank holds map ids to slots on
the device and are checked once per step; a step that meets a missing expert runs again on
the host path. The tokens, log-probabilities and bank counters are those of the host path."""

from __future__ import annotations

import pytest

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.events import GenerationStats
from mach.decode.params import SamplingParams
from mach.decode.payoff import Payoff
from mach.default_model import default_model_path
from mach.experts.device_routing import DEVICE_ROUTING_ENV, RETRIES, DeviceRouting

PROMPT = "def parse_config(path):\n    with open(path) as f:\n"
# About 95% of the default model's experts (banks hold float32 on a CPU): most steps find
# every expert held, some do not.
BUDGET = "40MB"
Run = tuple[list[int], list[float | None], GenerationStats]


def _run(monkeypatch: pytest.MonkeyPatch, on: bool, params: SamplingParams,
         **options: object) -> tuple[list[Run], dict[str, int]]:  # fmt: skip
    """Two generations of ``params`` on one engine (the second finds the bank warm), and the
    bank's decode counters after them."""
    monkeypatch.setenv(DEVICE_ROUTING_ENV, "1" if on else "0")
    loaded = load_moe(default_model_path(), expert_budget=options.pop("budget", BUDGET),
                      **options)  # type: ignore[arg-type]  # fmt: skip
    engine = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new)
    assert (engine.routing is not None) is on
    # Route on the device whenever the bank allows, never probing the host path's speed.
    engine.routing_payoff = Payoff("device", "host", window=10**9)
    assert loaded.tokenizer is not None
    prompt = loaded.tokenizer.encode(PROMPT)
    runs = []
    for _ in range(2):
        tokens, logprobs, stats = [], [], GenerationStats()
        for event in engine.stream(prompt, params):
            if event.token is not None:
                tokens.append(event.token)
                logprobs.append(event.logprob)
            stats = event.stats or stats
        runs.append((tokens, logprobs, stats))
    decode = loaded.store.stats()["decode"]
    return runs, {k: decode[k] for k in ("hits", "misses", "bytes_read")}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=96, temperature=0.0, logprobs=0),
        SamplingParams(max_tokens=96, temperature=0.8, seed=3, logprobs=0),
        SamplingParams(max_tokens=64, temperature=0.7, seed=5, repetition_penalty=1.3),
    ],
    ids=["greedy", "seeded", "repetition-penalty"],
)
@pytest.mark.parametrize("slot_pool", ["layer", "shared"])
@pytest.mark.parametrize("retries", [RETRIES, 0], ids=["fetch-and-retry", "host-fallback"])
def test_device_routed_steps_give_the_host_paths_tokens(
    params: SamplingParams, slot_pool: str, retries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mach.decode.engine.RETRIES", retries)
    host, host_counts = _run(monkeypatch, False, params, slot_pool=slot_pool)
    device, counts = _run(monkeypatch, True, params, slot_pool=slot_pool)
    (_, _, cold), (_, _, warm) = device
    # The cold run meets misses (steps dropped and run again); the warm one finds every
    # expert of the same tokens held and stays on the device after its first step.
    assert cold.rerouted_steps > 0
    assert warm.rerouted_steps == 0
    assert warm.device_routed_steps == warm.generation_tokens - 1
    for (tokens, logprobs, _), (host_tokens, host_logprobs, _) in zip(device, host, strict=True):
        assert tokens == host_tokens
        assert logprobs == host_logprobs
    if retries == 0:
        # Kept steps count their hits as the host path would; dropped ones count nothing.
        assert counts == host_counts
    else:
        # A dropped step's later layers routed from a wrong hidden state: what they fetched
        # is read and counted (a miss, its bytes), so the counts drift a little.
        expert_bytes = host_counts["bytes_read"] // host_counts["misses"]
        assert counts["bytes_read"] == counts["misses"] * expert_bytes
        assert abs(counts["misses"] - host_counts["misses"]) <= host_counts["misses"] // 10


def test_device_routing_needs_streaming_banks_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resident = load_moe(default_model_path(), streaming=False)
    monkeypatch.setenv(DEVICE_ROUTING_ENV, "1")
    assert DeviceRouting.of(resident.model) is None
    streamed = load_moe(default_model_path(), expert_budget=BUDGET)
    assert DeviceRouting.of(streamed.model) is not None
    monkeypatch.setenv(DEVICE_ROUTING_ENV, "0")
    assert DeviceRouting.of(streamed.model) is None


def test_the_engine_keeps_the_faster_routing() -> None:
    payoff = Payoff("device", "host", window=2, probe=2, hold=4)
    for seconds in (0.010, 0.010):  # device: 100 tok/s
        assert payoff.trying
        payoff.record(1, seconds)
    for seconds in (0.005, 0.005):  # host: 200 tok/s
        assert not payoff.trying
        payoff.record(1, seconds)
    assert not payoff.trying and payoff.left == 4  # the host path holds, then device again
