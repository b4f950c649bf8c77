"""OpenAI response bodies and SSE chunks built from mach's token events."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from mach.chat.tool_calls import ParsedToolCall
from mach.decode.events import GenerationStats, TokenEvent
from mach.tokenizer.tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(*choices: GenerationStats) -> dict[str, Any]:
    """OpenAI's usage block over a request's choices: the prompt counted once, every choice's
    tokens; ``cached_tokens`` counts prompt tokens the first restored from the cache."""
    first = choices[0]
    generated = sum(stats.generation_tokens for stats in choices)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": generated,
            "total_tokens": first.prompt_tokens + generated,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}  # fmt: skip


def tool_calls_json(calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    return [
        {"index": i, "id": new_id("call"), "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for i, c in enumerate(calls)
    ]  # fmt: skip


def chat_logprobs(tokenizer: Tokenizer, events: list[TokenEvent]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for e in events:
        if e.token is None or e.logprob is None:
            continue
        item = entry(e.token, e.logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in e.top_logprobs or []]
        content.append(item)
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, events: list[TokenEvent]) -> dict[str, Any]:
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for e in events:
        if e.token is None or e.logprob is None:
            continue
        text = tokenizer.decode([e.token], skip_special_tokens=False)
        tokens.append(text)
        values.append(e.logprob)
        tops.append({tokenizer.decode([t], skip_special_tokens=False): lp
                     for t, lp in e.top_logprobs or []})  # fmt: skip
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None,
          logprobs: dict[str, Any] | None = None, index: int = 0) -> str:  # fmt: skip
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}]}  # fmt: skip
    return f"data: {json.dumps(body)}\n\n"


def usage_chunk(cid: str, obj: str, created: int, model: str,
                choices: list[GenerationStats]) -> str:  # fmt: skip
    """The final SSE chunk of ``stream_options.include_usage``: no choices, the usage."""
    body = {"id": cid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(*choices)}  # fmt: skip
    return f"data: {json.dumps(body)}\n\n"


def now() -> int:
    return int(time.time())
