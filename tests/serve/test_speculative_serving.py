"""Serving a DeepSeek-V4 release checkpoint: the MTP draft behind the OpenAI API."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from tests.serve.conftest import Running, serve_with

FIXTURE = Path(__file__).parents[1] / "fixtures" / "deepseek_v4" / "upstream-fp8"


@pytest.fixture(scope="module")
def v4() -> Iterator[Running]:
    # The fixture's MTP head is random and never confident: open the gate so it drafts.
    saved = os.environ.get("LME_RHO_GATE")
    os.environ["LME_RHO_GATE"] = "0"
    try:
        yield from serve_with(model=str(FIXTURE))
    finally:
        os.environ.pop("LME_RHO_GATE")
        if saved is not None:
            os.environ["LME_RHO_GATE"] = saved


def test_capabilities_report_the_draft(v4: Running) -> None:
    body = httpx.get(f"{v4.url}/v1/capabilities").json()
    assert body["server"]["speculative_decoding"] == {"family": "mtp_eagle3", "draft_tokens": 2}
    assert body["arch"]["name"] == "deepseek_v4"
    assert body["arch"]["continuous_batching"] is False
    server = body["server"]
    assert server["continuous_batching"] is False and server["max_batch"] == 1
    assert "compressed" in server["sequential_reason"]


def test_greedy_completion_equals_target_only(v4: Running) -> None:
    client = openai.OpenAI(base_url=f"{v4.url}/v1", api_key="unused")
    prompt = "def add(a, b):"
    out = client.completions.create(
        model=v4.state.model_id, prompt=prompt, max_tokens=24, temperature=0
    )
    state = v4.state
    tokens = state.tokenizer.encode(prompt)
    engine = TargetEngine(state.worker.engine.model, state.tokenizer,  # type: ignore[attr-defined]
                          state.worker.engine.make_cache)  # type: ignore[attr-defined]  # fmt: skip
    expected = engine.generate(tokens, SamplingParams(max_tokens=24, temperature=0.0))
    assert out.choices[0].text == expected.text
    assert state.worker.engine.gate.rho == 0  # type: ignore[attr-defined]


def test_no_draft_serves_target_only() -> None:
    from mach_serve import build_state

    state = build_state(str(FIXTURE), draft=False, max_batch=4)
    # Its compressed cache cannot batch: requests run one at a time, and the report says why.
    assert isinstance(state.worker.engine, TargetEngine)
    assert state.sequential_reason is not None and "CompressedCache" in state.sequential_reason
    state.worker.shutdown()
