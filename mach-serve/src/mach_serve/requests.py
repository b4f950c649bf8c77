"""Turning OpenAI request bodies into a prompt and sampling parameters, with clear errors."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgspec

from mach.decode.params import SamplingParams
from mach.tokenizer.tokenizer import ChatTemplateError
from mach_serve.errors import APIError
from mach_serve.schemas import ChatCompletionRequest, CompletionRequest, Message, SamplingFields
from mach_serve.state import ServerState

T = TypeVar("T")
JSON_HINT = "Respond with one valid JSON object and nothing else."


def decode_body(body: bytes, kind: type[T]) -> T:
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise APIError(400, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in (state.model_id, "default"):
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {state.model_id!r}",
            param="model",
            code="model_not_found",
        )


def _message_dict(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                           "content": message.text()}  # fmt: skip
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            arguments = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    raise APIError(400, "tool call arguments must be a JSON object",
                                   param="messages") from None  # fmt: skip
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            )
        out["tool_calls"] = calls
    return out


def chat_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], str]:
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    messages = [_message_dict(m) for m in req.messages]
    if req.response_format is not None and req.response_format.type != "text":
        # Best effort: ask for JSON in words; output is not constrained.
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{JSON_HINT}".strip()
        else:
            messages.insert(0, {"role": "system", "content": JSON_HINT})
    tools = req.tools if req.tool_choice != "none" else None
    try:
        text = state.tokenizer.apply_chat_template(messages, tools=tools)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return state.tokenizer.encode(text, add_special_tokens=False), text


def completion_prompt(state: ServerState, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(type(p) is int for p in prompt):
        ids = [int(p) for p in prompt]
        if any(not 0 <= p < state.tokenizer.vocab_size for p in ids):
            raise APIError(400, "prompt token ids are out of the vocabulary", param="prompt")
        return ids
    if isinstance(prompt, list):
        if not all(isinstance(p, str) for p in prompt):
            raise APIError(400, "prompt must be a string, a list of strings or a list of token "
                           "ids", param="prompt")  # fmt: skip
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request (n=1)", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string", param="prompt")
    return state.tokenizer.encode(prompt)


def sampling(
    state: ServerState,
    req: SamplingFields,
    prompt: list[int],
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    room = state.context_length - len(prompt)
    if room <= 0:
        raise APIError(
            400,
            f"the prompt is {len(prompt)} tokens; this model's context is "
            f"{state.context_length} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    limit = room if max_tokens is None else max_tokens
    if not 1 <= limit <= room:
        raise APIError(
            400,
            f"max_tokens must be between 1 and {room} (context {state.context_length} minus the "
            f"{len(prompt)}-token prompt), got {max_tokens}",
            param="max_tokens",
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    try:
        return SamplingParams(
            max_tokens=limit,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=stop,
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
