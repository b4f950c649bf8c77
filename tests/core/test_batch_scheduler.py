"""ContinuousBatchScheduler: per-sequence settings, joining, leaving, cancelling, long prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mach import load_moe
from mach.cache.prefix import PrefixCache
from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.batch_sequence import Phase
from mach.decode.engine import TargetEngine
from mach.decode.events import TokenEvent
from mach.decode.params import SamplingParams
from mach.experts.decode_reads import DecodeReads
from mach.io.load import LoadedModel

FIXTURE = Path(__file__).parents[1] / "fixtures" / "qwen3_moe" / "hf-per-expert"


class CountingModel(nn.Module):
    """The model, recording the ``[batch, tokens]`` shape of every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.calls: list[tuple[int, int]] = []

    def __call__(self, tokens: mx.array, cache: Any = None) -> mx.array:
        self.calls.append((tokens.shape[0], tokens.shape[1]))
        out: mx.array = self.inner(tokens, cache=cache)
        return out


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_moe(FIXTURE)


@pytest.fixture(scope="module")
def alone(loaded: LoadedModel) -> TargetEngine:
    return TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new, prefill_step_size=8)


def scheduler(loaded: LoadedModel, **options: Any) -> ContinuousBatchScheduler:
    options.setdefault("prefill_step_size", 8)
    return ContinuousBatchScheduler(loaded.model, loaded.tokenizer, loaded.cache.new, **options)


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=n).tolist() for n in lengths]


def test_mixed_sampling_settings_each_match_a_sequential_run(
    loaded: LoadedModel, alone: TargetEngine
) -> None:
    assert loaded.tokenizer is not None
    text = loaded.tokenizer.encode("import os\nimport sys\n")
    free = alone.generate(text, SamplingParams(max_tokens=12))
    settings = [
        SamplingParams(max_tokens=12),
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7),
        SamplingParams(max_tokens=9, temperature=1.2, top_k=20, min_p=0.05, seed=11),
        SamplingParams(max_tokens=8, repetition_penalty=1.3, repetition_context=16),
        SamplingParams(max_tokens=7, logprobs=4),
        SamplingParams(max_tokens=12, stop=[free.text[5:8]]),
        SamplingParams(max_tokens=12, stop_token_ids=[free.tokens[4]]),
        SamplingParams(max_tokens=3),
    ]
    inputs = [text, *prompts(5, 9, 1, 14, seed=3), text, text, [7]]
    want = [alone.generate(p, s) for p, s in zip(inputs, settings, strict=True)]
    got = scheduler(loaded, max_batch=8).generate_batch(inputs, settings)
    for w, g in zip(want, got, strict=True):
        assert (g.tokens, g.text, g.finish_reason) == (w.tokens, w.text, w.finish_reason)
        assert g.stats.prompt_tokens == w.stats.prompt_tokens
        assert g.stats.generation_tokens == w.stats.generation_tokens
    assert [g.finish_reason for g in got[5:7]] == ["stop", "stop"]


def test_sequences_wait_for_room_and_join_as_others_leave(loaded: LoadedModel) -> None:
    engine = scheduler(loaded, max_batch=2)
    short, long_, late = (engine.add(p, SamplingParams(max_tokens=n))
                          for p, n in zip(prompts(4, 6, 5), (3, 10, 4), strict=True))  # fmt: skip
    sizes = []
    while not engine.idle:
        engine.step()
        sizes.append(engine.batch_size)
        if not short.done:
            assert late.phase is Phase.WAITING
    assert max(sizes) == 2
    assert all(s.phase is Phase.FINISHED for s in (short, long_, late))
    assert [len(s.result().tokens) for s in (short, long_, late)] == [3, 10, 4]


def test_a_cancelled_sequence_leaves_at_once_and_the_others_are_untouched(
    loaded: LoadedModel, alone: TargetEngine
) -> None:
    engine = scheduler(loaded, max_batch=4)
    inputs = prompts(6, 11, 3)
    params = SamplingParams(max_tokens=12)
    seqs = [engine.add(p, params) for p in inputs]
    events: list[list[TokenEvent]] = [[] for _ in seqs]
    for _ in range(4):
        engine.step()
        for i, s in enumerate(seqs):
            events[i].extend(s.drain())
    assert engine.batch_size == 3
    produced = seqs[1].generated
    seqs[1].cancel()
    engine.step()
    assert seqs[1].phase is Phase.CANCELLED and engine.batch_size == 2
    assert seqs[1].drain() == []
    while not engine.idle:
        engine.step()
    for i in (0, 2):
        tokens = [e.token for e in events[i] + seqs[i].drain() if e.token is not None]
        assert tokens == alone.generate(inputs[i], params).tokens
    assert produced > 0 and len([e for e in events[1] if e.token is not None]) == produced


def test_a_cancelled_waiting_sequence_never_starts(loaded: LoadedModel) -> None:
    counting = CountingModel(loaded.model)
    engine = ContinuousBatchScheduler(counting, loaded.tokenizer, loaded.cache.new, max_batch=1)
    first, second = (engine.add(p, SamplingParams(max_tokens=3)) for p in prompts(5, 40))
    second.cancel()
    while not engine.idle:
        engine.step()
    assert first.phase is Phase.FINISHED and second.phase is Phase.CANCELLED
    assert all(length < 40 for _, length in counting.calls)


def test_a_long_prompt_holds_running_streams_back_one_chunk_per_step(
    loaded: LoadedModel, alone: TargetEngine
) -> None:
    counting = CountingModel(loaded.model)
    engine = ContinuousBatchScheduler(counting, loaded.tokenizer, loaded.cache.new,
                                      max_batch=4, prefill_step_size=4)  # fmt: skip
    running = [engine.add(p, SamplingParams(max_tokens=30)) for p in prompts(3, 2)]
    for _ in range(3):
        engine.step()
    long_prompt = prompts(41, seed=5)[0]
    late = engine.add(long_prompt, SamplingParams(max_tokens=5))
    while late.phase is not Phase.DECODING:
        counting.calls.clear()
        before = [s.generated for s in running]
        engine.step()
        prefill_calls = [c for c in counting.calls if c[0] == 1 and c[1] > 1]
        assert len(prefill_calls) <= 1 and all(n <= 4 for _, n in prefill_calls)
        assert [s.generated for s in running] == [b + 1 for b in before]
    while not engine.idle:
        engine.step()
    assert late.result().tokens == alone.generate(long_prompt, SamplingParams(max_tokens=5)).tokens


def test_a_sequence_joins_from_its_cached_prefix(loaded: LoadedModel, alone: TargetEngine) -> None:
    prefix_cache = PrefixCache.for_model(loaded, 1 << 28, block_size=16)
    engine = scheduler(loaded, max_batch=4, prefix_cache=prefix_cache)
    first = prompts(40, seed=9)[0]
    params = SamplingParams(max_tokens=6)
    engine.generate_batch([first], params)
    longer, other = first + prompts(7, seed=10)[0], prompts(12, seed=11)[0]
    got = engine.generate_batch([longer, other], params)
    # A KV cache is snapshotted just before the first prompt's last token: 39 of its 40.
    assert got[0].stats.cached_tokens == 39 and got[1].stats.cached_tokens == 0
    assert got[0].tokens == alone.generate(longer, params).tokens
    assert got[1].tokens == alone.generate(other, params).tokens


def test_stream_gives_the_single_stream_events(loaded: LoadedModel, alone: TargetEngine) -> None:
    engine = scheduler(loaded)
    prompt, params = prompts(9, seed=2)[0], SamplingParams(max_tokens=6, logprobs=2)
    got, want = list(engine.stream(prompt, params)), list(alone.stream(prompt, params))
    assert [(e.token, e.text, e.finish_reason) for e in got] == [
        (e.token, e.text, e.finish_reason) for e in want
    ]
    final = got[-1].stats
    assert final is not None and final.generation_tokens == 6 and final.time_to_first_token > 0


def test_zero_tokens_empty_prompts_and_bad_settings(loaded: LoadedModel) -> None:
    engine = scheduler(loaded)
    done = engine.add([4, 5], SamplingParams(max_tokens=0))
    assert done.phase is Phase.FINISHED and done.result().finish_reason == "length"
    assert engine.idle
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add([], SamplingParams())
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        scheduler(loaded, max_batch=0)
    with pytest.raises(ValueError, match="2 prompts but 1 sampling settings"):
        engine.generate_batch([[1], [2]], [SamplingParams()])


def test_streaming_records_expert_reads_per_token_by_batch_size() -> None:
    resident = load_moe(FIXTURE)
    streamed = load_moe(FIXTURE, streaming=True)
    inputs = prompts(5, 8, 3, 6, seed=4)
    params = SamplingParams(max_tokens=6)
    want = scheduler(resident, max_batch=4).generate_batch(inputs, params)
    engine = scheduler(streamed, max_batch=4, store=streamed.store)
    got = engine.generate_batch(inputs, params)
    while not engine.idle:
        engine.step()
    assert [g.tokens for g in got] == [w.tokens for w in want]
    reads = streamed.store.stats()["decode_reads_by_batch"]
    assert sum(r["steps"] for r in reads.values()) == engine.steps
    assert sum(r["tokens"] for r in reads.values()) == 4 * 6
    assert reads["4"]["bytes_per_token"] == reads["4"]["bytes_read"] / reads["4"]["tokens"]
    assert sum(r["bytes_read"] for r in reads.values()) <= streamed.store.bytes_read


def test_decode_reads_refuse_impossible_steps() -> None:
    with pytest.raises(ValueError, match="batch >= 1"):
        DecodeReads().record(0, 0, 10)
    with pytest.raises(ValueError, match="tokens <= batch"):
        DecodeReads().record(2, 3, 10)


def test_short_prompts_prefill_together_up_to_one_chunk_of_tokens(loaded: LoadedModel) -> None:
    counting = CountingModel(loaded.model)
    engine = ContinuousBatchScheduler(counting, loaded.tokenizer, loaded.cache.new,
                                      max_batch=4, prefill_step_size=16)  # fmt: skip
    seqs = [engine.add(p, SamplingParams(max_tokens=4)) for p in prompts(6, 6, 6, 30)]
    engine.step()
    assert [s.phase for s in seqs] == [Phase.DECODING] * 3 + [Phase.PREFILLING]
    prefilled = [n for b, n in counting.calls if n > 1]
    assert prefilled == [5, 5, 5] and sum(prefilled) <= 16
    counting.calls.clear()
    engine.step()
    assert [n for b, n in counting.calls if n > 1] == [16]
