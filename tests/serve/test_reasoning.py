"""Reasoning text comes back apart from the answer, whole and streamed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from mach.chat.reasoning import ReasoningSplitter, ReasoningTags, split_reasoning
from tests.serve.conftest import Running, serve_with
from tests.serve.scripted import scripted_checkpoint

TAGS = ReasoningTags()
ANSWER = "ok</think>5"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def test_split_whole_outputs() -> None:
    assert split_reasoning("<think>a b</think>\n\nok", TAGS) == ("a b", "ok")
    assert split_reasoning("no thoughts", TAGS) == ("", "no thoughts")
    assert split_reasoning("still thinking", TAGS, started=True) == ("still thinking", "")
    assert split_reasoning("x</think>y", TAGS, started=True) == ("x", "y")


@pytest.mark.parametrize("cut", [1, 3, 7, 9, 13])
def test_streamed_split_matches_whole(cut: int) -> None:
    text = "<think>weigh it</think>answer"
    splitter = ReasoningSplitter(TAGS)
    parts = [splitter.feed(text[i : i + cut]) for i in range(0, len(text), cut)]
    parts.append(splitter.finish())
    reasoning = "".join(r for r, _ in parts)
    content = "".join(c for _, c in parts)
    assert (reasoning, content) == split_reasoning(text, TAGS)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    # The template opens the reasoning block itself, as Qwen3.5's does.
    root = scripted_checkpoint(tmp_path_factory.mktemp("thinker") / "model", ANSWER, MESSAGES,
                               template_suffix="<think>\n")  # fmt: skip
    yield from serve_with(model=str(root), model_name="thinker")


def test_reasoning_content_from_the_server(thinker: Running) -> None:
    client = OpenAI(base_url=f"{thinker.url}/v1", api_key="unused", max_retries=0)
    args = {"model": "thinker", "messages": MESSAGES, "temperature": 0, "max_tokens": 32}
    message = client.chat.completions.create(**args).choices[0].message
    assert message.content == "5"
    assert message.model_extra["reasoning_content"] == "ok"
    reasoning, content = "", ""
    for event in client.chat.completions.create(**args, stream=True):
        for choice in event.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == ("ok", "5")
