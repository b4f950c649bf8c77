"""Turning OpenAI request bodies into a prompt and sampling parameters, with clear errors.

Everything here runs on a preparation thread, never on the event loop: templating and
tokenizing a long prompt take long enough to stall every connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from mach.decode.grammar import Grammar, GrammarError, GrammarTokenizer
from mach.decode.params import SamplingParams
from mach.decode.structured import reply_format, reply_grammar, tool_specs
from mach.tokenizer.tokenizer import ChatTemplateError
from mach_serve.decoding import decode_body
from mach_serve.errors import APIError
from mach_serve.schemas import ChatCompletionRequest, CompletionRequest, Message, SamplingFields
from mach_serve.state import ServerState

Request = TypeVar("Request", bound=SamplingFields)
MAX_SEED = 2**64 - 1
MAX_CHOICES = 16
"""Choices per request (``n``); each is a sequence of its own in the queue and the batch."""
PIECE_CHARS = 2**15
CUT_ALLOWANCE = 8


@dataclass
class Prepared:
    """What a request asks the worker for."""

    prompt: list[int]
    params: SamplingParams
    text: str
    """Chat: the rendered prompt, which output parsing reads. Completions: the echo, or ''."""


def decode_request(state: ServerState, body: bytes, kind: type[Request]) -> Request:
    """The body as ``kind``, with every check that needs no prompt made."""
    req = decode_body(body, kind)
    check_model(state, req.model)
    check_fields(req)
    return req


def prepare_chat(state: ServerState, body: bytes) -> tuple[ChatCompletionRequest, Prepared]:
    req = decode_request(state, body, ChatCompletionRequest)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError(400, "top_logprobs must be between 0 and 20", param="top_logprobs")
    prompt, text = chat_prompt(state, req)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    limit: int | None = req.max_completion_tokens
    field = "max_completion_tokens"
    if limit is None:
        limit, field = req.max_tokens, "max_tokens"
    params = sampling(state, req, prompt, limit, logprobs, field)
    params.grammar = reply_constraint(state, req, text)
    return req, Prepared(prompt, params, text)


def prepare_completion(state: ServerState, body: bytes) -> tuple[CompletionRequest, Prepared]:
    req = decode_request(state, body, CompletionRequest)
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise APIError(400, "logprobs must be between 0 and 5", param="logprobs")
    prompt = completion_prompt(state, req)
    params = sampling(state, req, prompt, req.max_tokens or 16, req.logprobs)
    echo = state.tokenizer.decode(prompt) if req.echo else ""
    return req, Prepared(prompt, params, echo)


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in (state.model_id, "default"):
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {state.model_id!r}",
            param="model",
            code="model_not_found",
        )


TOOL_CHOICES = '\'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'


def forced_tool(req: ChatCompletionRequest) -> tuple[bool, str | None]:
    """Whether ``tool_choice`` demands a call, and of which function (``None``: any)."""
    choice = req.tool_choice
    if choice is None or choice in ("auto", "none"):
        return False, None
    if choice == "required":
        return True, None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise APIError(400, f"tool_choice must be {TOOL_CHOICES}", param="tool_choice")
    return True, name


def response_schema(req: ChatCompletionRequest) -> tuple[bool, dict[str, Any] | None, str]:
    """Whether the answer must be JSON, the schema it must follow, and its name."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return False, None, "response_format"
    if fmt.type == "json_object":
        return True, None, "response_format json_object"
    spec = fmt.json_schema
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON "
                       "schema object", param="response_format.json_schema")  # fmt: skip
    name = spec.get("name") if isinstance(spec, dict) else None
    return True, schema, f"response_format json_schema {name or 'schema'!r}"


def reply_constraint(state: ServerState, req: ChatCompletionRequest,
                     prompt_text: str) -> Grammar | None:  # fmt: skip
    """The grammar ``response_format`` and ``tool_choice`` impose, compiled once to check it."""
    must_call, name = forced_tool(req)
    json_answer, schema, label = response_schema(req)
    if not (must_call or json_answer):
        return None
    param = "tool_choice" if must_call else "response_format"
    try:
        tools = tool_specs(req.tools or []) if req.tool_choice != "none" else []
        if name is not None:
            tools = [t for t in tools if t.name == name]
            if not tools:
                raise APIError(400, f"tool_choice names {name!r}, which is not in tools",
                               param="tool_choice")  # fmt: skip
        fmt = reply_format(state.adapter, state.tokenizer.chat_template, prompt_text)
        grammar = reply_grammar(GrammarTokenizer.of(state.tokenizer), fmt, schema, json_answer,
                                tools, must_call, parallel=name is None
                                and req.parallel_tool_calls is not False,
                                name="tool_choice" if must_call else label)  # fmt: skip
        if grammar is not None:
            GrammarTokenizer.of(state.tokenizer).check(grammar)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=param) from None
    return grammar


def check_fields(req: SamplingFields) -> None:
    """Field checks that come before any templating or tokenizing."""
    if not 1 <= req.n <= MAX_CHOICES:
        raise APIError(400, f"n must be between 1 and {MAX_CHOICES}, got {req.n}", param="n")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise APIError(400, f"seed must be between 0 and {MAX_SEED} (2**64 - 1), got {req.seed}",
                       param="seed")  # fmt: skip
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")


def check_prompt_bytes(state: ServerState, size: int, param: str) -> None:
    if size > state.max_prompt_bytes:
        raise APIError(400, f"the prompt is {size} bytes; this server takes at most "
                       f"{state.max_prompt_bytes} (--max-prompt-bytes)", param=param,
                       code="prompt_too_long")  # fmt: skip


def token_limit(state: ServerState) -> tuple[int, str, str]:
    """The most prompt tokens a request may have, why, and the error code for more."""
    room = state.context_length - 1
    if state.max_prompt_tokens is not None and state.max_prompt_tokens < room:
        return state.max_prompt_tokens, "--max-prompt-tokens", "prompt_too_long"
    return room, f"this model's context is {state.context_length} tokens", "context_length_exceeded"


def check_prompt_tokens(state: ServerState, count: int, param: str, at_least: bool = False) -> None:
    limit, why, code = token_limit(state)
    if count > limit:
        size = f"more than {limit}" if at_least else str(count)
        raise APIError(400, f"the prompt is {size} tokens; the limit is {limit} ({why})",
                       param=param, code=code)  # fmt: skip


def encode_prompt(state: ServerState, text: str, param: str, special: bool) -> list[int]:
    """``text``'s tokens; a text far over the limit is refused before it is tokenized whole.

    Tokenizing megabytes takes seconds and hundreds of megabytes, so a text long for its limit
    is first counted in pieces, stopping as soon as the count is certainly over. A cut can
    split a token in two; the allowance per piece keeps that from refusing a prompt that fits.
    """
    limit = token_limit(state)[0]
    if len(text) > PIECE_CHARS and len(text) > 4 * limit:
        count = 0
        for pieces, start in enumerate(range(0, len(text), PIECE_CHARS), 1):
            piece = text[start : start + PIECE_CHARS]
            count += len(state.tokenizer.encode(piece, add_special_tokens=False))
            if count > limit + CUT_ALLOWANCE * pieces:
                check_prompt_tokens(state, count, param, at_least=True)
    return state.tokenizer.encode(text, add_special_tokens=special)


def _message_dict(message: Message, index: int) -> dict[str, Any]:
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
                except (json.JSONDecodeError, RecursionError):
                    raise APIError(400, "tool call arguments must be a JSON object",
                                   param=f"messages[{index}].tool_calls") from None  # fmt: skip
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
    messages = [_message_dict(m, i) for i, m in enumerate(req.messages)]
    tools = req.tools if req.tool_choice != "none" else None
    size = sum(len(m["content"].encode()) for m in messages)
    check_prompt_bytes(state, size + len(msgspec.json.encode(tools)) if tools else size,
                       "messages")  # fmt: skip
    try:
        text = state.tokenizer.apply_chat_template(messages, tools=tools)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return encode_prompt(state, text, "messages", special=False), text


def completion_prompt(state: ServerState, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(type(p) is int for p in prompt):
        check_prompt_tokens(state, len(prompt), "prompt")
        ids = [int(p) for p in prompt]
        if any(not 0 <= p < state.tokenizer.vocab_size for p in ids):
            raise APIError(400, "prompt token ids are out of the vocabulary", param="prompt")
        return ids
    if isinstance(prompt, list):
        if not all(isinstance(p, str) for p in prompt):
            raise APIError(400, "prompt must be a string, a list of strings or a list of token "
                           "ids", param="prompt")  # fmt: skip
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request (use n for several completions)",
                           param="prompt")  # fmt: skip
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string", param="prompt")
    check_prompt_bytes(state, len(prompt.encode()), "prompt")
    return encode_prompt(state, prompt, "prompt", special=True)


# The ranges OpenAI's API accepts, so a client's mistake is caught the same way here.
RANGES = (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2),
          ("frequency_penalty", -2, 2))  # fmt: skip


def sampling(
    state: ServerState,
    req: SamplingFields,
    prompt: list[int],
    max_tokens: int | None,
    logprobs: int | None,
    max_tokens_field: str = "max_tokens",
) -> SamplingParams:
    prompt_field = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    check_prompt_tokens(state, len(prompt), prompt_field)
    room = state.context_length - len(prompt)
    limit = room if max_tokens is None else max_tokens
    if not 1 <= limit <= room:
        raise APIError(
            400,
            f"{max_tokens_field} must be between 1 and {room} (context {state.context_length} "
            f"minus the {len(prompt)}-token prompt), got {max_tokens}",
            param=max_tokens_field,
        )
    for name, low, high in RANGES:
        value = getattr(req, name)
        if not low <= value <= high:
            raise APIError(400, f"{name} must be between {low} and {high}, got {value}",
                           param=name)  # fmt: skip
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            max_tokens=limit,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            stop=stop,
            logprobs=logprobs,
        )
    except ValueError as exc:
        # SamplingParams names the field first in each problem it reports.
        raise APIError(400, str(exc), param=str(exc).split()[0]) from None
