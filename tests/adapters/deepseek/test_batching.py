"""DeepSeek-V4's compressed cache has no batched form: it decodes one sequence at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from mach import load_moe
from mach.cache.batch import BatchCache
from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import batching_blocker, build_engine

FIXTURE = Path(__file__).parents[2] / "fixtures" / "deepseek_v4" / "hf-fused"


def test_the_scheduler_refuses_it_and_says_why() -> None:
    loaded = load_moe(FIXTURE)
    with pytest.raises(ValueError, match=r"CompressedCache \(compressed\)"):
        ContinuousBatchScheduler(loaded.model, loaded.tokenizer, loaded.cache.new)
    with pytest.raises(ValueError, match="cannot batch"):
        BatchCache(loaded.cache)
    reason = batching_blocker(loaded)
    assert reason is not None and reason.startswith("deepseek_v4:")


def test_engine_selection_falls_back_to_one_sequence_at_a_time() -> None:
    loaded = load_moe(FIXTURE)
    engine = build_engine(loaded, draft=False, max_batch=8)
    assert isinstance(engine, TargetEngine)
    result = engine.generate([5, 9, 11, 3], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(result.tokens) == 4
