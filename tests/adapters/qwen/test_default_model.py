"""The embedded default model: a trained qwen3_moe, checked against transformers."""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model import default_model_path

DATA = default_model_path()


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any, Any, Any]:
    return load_moe(DATA, dtype="float32")


def test_it_is_a_real_moe_of_the_documented_shape(loaded: tuple[Any, ...]) -> None:
    _, tokenizer, store, _ = loaded
    config = json.loads((DATA / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == 32
    assert store.stats()["layers"] == config["num_hidden_layers"] == 6
    assert "12,767,232" in (DATA / "README.md").read_text()
    assert tokenizer is not None


def test_logits_match_transformers(loaded: tuple[Any, ...]) -> None:
    model = loaded[0]
    with np.load(DATA / "reference.npz") as ref:
        logits = np.array(model(mx.array(ref["input_ids"])))
        assert np.abs(logits - ref["logits"]).max() <= 1e-4


def test_greedy_text_matches_the_recorded_sample(loaded: tuple[Any, ...]) -> None:
    model, tokenizer, _, cache = loaded
    sample = json.loads((DATA / "sample.json").read_text())
    engine = TargetEngine(model, tokenizer, cache.new)
    params = SamplingParams(max_tokens=len(sample["greedy_ids"]), stop_token_ids=[])
    first = engine.generate(sample["prompt_ids"], params)
    assert first.tokens == sample["greedy_ids"]
    assert first.text == sample["greedy_text"]
    assert engine.generate(sample["prompt_ids"], params).tokens == first.tokens


def test_tokenizer_has_chat_tool_and_mask_tokens(loaded: tuple[Any, ...]) -> None:
    tokenizer = loaded[1]
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>", "<|mask|>"):  # fmt: skip
        assert tokenizer.token_id(token) is not None, token
    ends = {tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")}
    assert ends <= tokenizer.eos_token_ids


def test_chat_template_renders_tools_and_tool_calls(loaded: tuple[Any, ...]) -> None:
    tokenizer = loaded[1]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
    ]  # fmt: skip
    text = tokenizer.apply_chat_template(messages, tools=tools)
    assert text.startswith("<|im_start|>system\nYou add numbers.")
    assert '"name": "add"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    assert "<tool_response>\n5\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
