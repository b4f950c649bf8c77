"""Tool calls in generated text, whole and streamed."""

from __future__ import annotations

from mach.chat.tool_calls import ToolCallSplitter, parse_tool_calls

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def test_plain_text_has_no_calls() -> None:
    assert parse_tool_calls("just text") == ("just text", [])


def test_one_call_with_leading_content() -> None:
    content, calls = parse_tool_calls("Let me add.\n" + CALL)
    assert content == "Let me add."
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 2, "b": 3})]


def test_several_calls_and_string_arguments() -> None:
    text = CALL + '<tool_call>{"name": "neg", "arguments": "{\\"x\\": 1}"}</tool_call>'
    _, calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 2, "b": 3}), ("neg", {"x": 1})]


def test_broken_json_stays_content() -> None:
    content, calls = parse_tool_calls("<tool_call>{not json</tool_call> tail")
    assert calls == [] and "not json" in content


def test_unclosed_block_still_parses_when_complete_json() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')
    assert [c.name for c in calls] == ["f"]


def test_splitter_streams_content_and_keeps_the_call() -> None:
    splitter = ToolCallSplitter()
    pieces = [
        "Sure",
        ", adding. <tool",
        '_call>\n{"name"',
        ': "add", "arguments": {}}\n</tool_call>',
    ]
    streamed = "".join(splitter.feed(p) for p in pieces) + splitter.finish()
    assert streamed == "Sure, adding. "
    assert parse_tool_calls(splitter.tail)[1][0].name == "add"


def test_splitter_releases_a_false_start() -> None:
    splitter = ToolCallSplitter()
    assert splitter.feed("a <tool") == "a "
    assert splitter.feed("box>") == "<toolbox>"
    assert splitter.tail == ""


def test_gemma_tool_call_format() -> None:
    from mach.chat.tool_calls import parse_gemma_tool_calls

    text = 'Sure.<|tool_call>call:search{query:<|"|>a, b: c<|"|>,limit:5,exact:true}<tool_call|>'
    content, calls = parse_gemma_tool_calls(text)
    assert content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [
        ("search", {"query": "a, b: c", "limit": 5, "exact": True})
    ]
    assert parse_gemma_tool_calls("<|tool_call>garbage<tool_call|>")[1] == []


def test_gemma_adapter_output_streams_content_and_parses_calls() -> None:
    from mach import REGISTRY
    from mach.decode.events import TokenEvent
    from mach.default_model import default_model_path
    from mach.tokenizer.tokenizer import load_tokenizer
    from mach_serve.output import chat_output

    tokenizer = load_tokenizer(default_model_path())
    assert tokenizer is not None
    text = "Let me look.<|tool_call>call:add{a:2,b:3}<tool_call|>"
    output = chat_output(REGISTRY["gemma4"], tokenizer, "", tools=True)
    parts = [output.feed(TokenEvent(t, "")) for t in tokenizer.encode(text)]
    parts.append(output.finish())
    assert "".join(p.content for p in parts) == "Let me look."
    assert [(c.name, c.arguments) for c in output.calls] == [("add", {"a": 2, "b": 3})]
