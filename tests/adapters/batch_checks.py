"""Checks every batchable family runs: a batch of ragged sequences decodes as each would alone.

Rows join and leave at different steps, prompts have different lengths (longer than a sliding
window where the family has one) and one prompt prefills in several chunks.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from mach import load_moe
from mach.cache.batch import BatchCache
from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.engine import TargetEngine
from mach.decode.events import TokenEvent
from mach.decode.params import SamplingParams

LENGTHS = (5, 1, 21, 9)
"""Prompt lengths: one token alone, and some longer than the fixtures' sliding windows."""


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 200, size=n).tolist() for n in LENGTHS]


def batched_logits_match_single(layout_dir: Path, steps: int = 10, atol: float = 1e-4) -> None:
    """Greedy decode in a ``BatchCache`` whose rows join at steps 0, 0, 3 and 5 and leave after
    ``steps`` tokens each gives the logits of each sequence decoded alone. The one-token prompt
    joins first, with an empty cache, so the next row finds a batch that holds nothing yet."""
    model, _, _, cache = load_moe(layout_dir, dtype="float32")
    prompts = _prompts()

    def prefilled(prompt: list[int]) -> object:
        own = cache.new()
        if len(prompt) > 1:
            model(mx.array([prompt[:-1]]), cache=own)
        return own

    alone = []
    for prompt in prompts:
        own, token, rows = prefilled(prompt), prompt[-1], []
        for _ in range(steps):
            logits = model(mx.array([[token]]), cache=own)[0, -1]
            rows.append(np.array(logits))
            token = int(mx.argmax(logits).item())
        alone.append(rows)

    batch = BatchCache(cache)
    joins = {0: [1, 0], 3: [2], 5: [3]}
    members: list[int] = []
    tokens: list[int] = []
    got: list[list[np.ndarray]] = [[] for _ in prompts]
    for step in range(steps + 6):
        for i in joins.get(step, []):
            batch.add(prefilled(prompts[i]))  # type: ignore[arg-type]
            members.append(i)
            tokens.append(prompts[i][-1])
        if not members:
            continue
        logits = model(mx.array(tokens)[:, None], cache=batch)[:, -1]
        for row, i in enumerate(members):
            got[i].append(np.array(logits[row]))
            tokens[row] = int(mx.argmax(logits[row]).item())
        keep = [row for row, i in enumerate(members) if len(got[i]) < steps]
        if len(keep) < len(members):
            batch.keep(keep)
            members, tokens = [members[r] for r in keep], [tokens[r] for r in keep]
    assert batch.rows == 0
    for want, have in zip(alone, got, strict=True):
        np.testing.assert_allclose(np.stack(have), np.stack(want), atol=atol, rtol=0)


def scheduler_matches_sequential(layout_dir: Path, atol: float = 1e-4) -> None:
    """Greedy tokens through ``ContinuousBatchScheduler`` (two rows at a time, so sequences
    wait, join and leave mid-batch; prefill in chunks of 4) equal ``TargetEngine``'s, and
    their log-probabilities agree within ``atol``."""
    model, tokenizer, _, cache = load_moe(layout_dir, dtype="float32")
    prompts = _prompts(1)
    params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=3) for n in (9, 14, 6, 11)]
    alone = TargetEngine(model, tokenizer, cache.new, prefill_step_size=4)
    want = [alone.generate(p, q) for p, q in zip(prompts, params, strict=True)]
    batched = ContinuousBatchScheduler(model, tokenizer, cache.new, max_batch=2,
                                       prefill_step_size=4)  # fmt: skip
    seqs = [batched.add(p, q) for p, q in zip(prompts, params, strict=True)]
    events: list[list[TokenEvent]] = [[] for _ in seqs]
    widest = 0
    while not batched.idle:
        batched.step()
        widest = max(widest, batched.batch_size)
        for i, seq in enumerate(seqs):
            events[i].extend(seq.drain())
    assert widest == 2
    for i, (result, got) in enumerate(zip(want, events, strict=True)):
        assert [e.token for e in got if e.token is not None] == result.tokens, i
    plain = [list(alone.stream(p, q)) for p, q in zip(prompts, params, strict=True)]
    for a_events, b_events in zip(plain, events, strict=True):
        for a, b in zip(a_events, b_events, strict=True):
            if a.logprob is None:
                assert a.token is None and b.token is None
                continue
            assert b.logprob is not None and abs(a.logprob - b.logprob) < atol
            assert a.top_logprobs is not None and b.top_logprobs is not None
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
            for (_, x), (_, y) in zip(a.top_logprobs, b.top_logprobs, strict=True):
                assert abs(x - y) < atol
