"""The starlette application: OpenAI-compatible routes over one model worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mach.capabilities import available
from mach.decode.events import GenerationStats, TokenEvent
from mach.decode.params import SamplingParams
from mach.registry import arch_summary
from mach_serve import requests as parse
from mach_serve.errors import APIError
from mach_serve.output import Delta, chat_output
from mach_serve.responses import (
    chat_logprobs,
    chunk,
    completion_logprobs,
    new_id,
    now,
    tool_calls_json,
    usage,
    usage_chunk,
)
from mach_serve.schemas import ChatCompletionRequest, CompletionRequest
from mach_serve.state import ServerState
from mach_serve.worker import Job, QueueFullError, ShuttingDownError

Handler = Callable[[Request], Any]


async def read_body(request: Request, state: ServerState) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise APIError(413, f"request body over {state.max_body_bytes} bytes", code="too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > state.max_body_bytes:
            raise APIError(413, f"request body over {state.max_body_bytes} bytes", code="too_large")
    return bytes(body)


def start_job(state: ServerState, prompt: list[int], params: SamplingParams) -> Job:
    job = Job(prompt, params, asyncio.get_running_loop())
    try:
        state.worker.submit(job)
    except QueueFullError as exc:
        raise APIError(503, f"server busy: {exc}; retry shortly", kind="server_error",
                       code="overloaded", headers={"Retry-After": "1"}) from None  # fmt: skip
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), kind="server_error", code="shutting_down") from None
    state.metrics.prompt_tokens += len(prompt)
    return job


async def collect(state: ServerState, job: Job) -> tuple[str, list[TokenEvent], TokenEvent]:
    events, text = [], []
    async for event in job.stream():
        events.append(event)
        text.append(event.text)
        if event.finish_reason is not None:
            record(state, event.stats)
            return "".join(text), events, event
    raise APIError(500, "generation ended without finishing", kind="server_error")


def record(state: ServerState, stats: GenerationStats | None) -> None:
    if stats is not None:
        state.metrics.generated_tokens += stats.generation_tokens
        state.metrics.last_generation_tps = stats.generation_tps


async def sse(state: ServerState, job: Job, make: Callable[..., AsyncIterator[str]]) -> Response:
    async def body() -> AsyncIterator[str]:
        finished = False
        try:
            async for piece in make():
                yield piece
            finished = True
        except Exception as exc:  # the stream has started: report in-band, then end
            error = {"error": {"message": str(exc), "type": "server_error"}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            if not finished:
                state.metrics.cancelled += 1
            job.cancelled.set()
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def create_app(state: ServerState, cors_origins: list[str] | None = None) -> Starlette:
    """The application serving ``state``'s model."""

    def route(endpoint: str, handler: Handler, methods: list[str]) -> Route:
        async def wrapped(request: Request) -> Response:
            status = 500
            try:
                if state.api_key is not None and endpoint != "health":
                    expected = f"Bearer {state.api_key}"
                    if request.headers.get("authorization") != expected:
                        raise APIError(401, "missing or wrong API key: send Authorization: "
                                       "Bearer <key>", kind="authentication_error",
                                       code="invalid_api_key")  # fmt: skip
                response: Response = await handler(request)
                status = response.status_code
                return response
            except APIError as exc:
                status = exc.status
                return exc.response()
            except Exception as exc:  # nothing a client sends may take the server down
                return APIError(500, f"internal error: {exc}", kind="server_error").response()
            finally:
                state.metrics.requests[(endpoint, status)] += 1

        return Route(f"/{endpoint}" if endpoint == "health" else f"/v1/{endpoint}",
                     wrapped, methods=methods)  # fmt: skip

    async def chat(request: Request) -> Response:
        req = parse.decode_body(await read_body(request, state), ChatCompletionRequest)
        parse.check_model(state, req.model)
        prompt, prompt_text = parse.chat_prompt(state, req)
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, "top_logprobs must be between 0 and 20", param="top_logprobs")
        wanted = (top or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = parse.sampling(state, req, prompt, max_tokens, wanted)
        job = start_job(state, prompt, params)
        cid, created, model = new_id("chatcmpl"), now(), state.model_id
        tools = bool(req.tools) and req.tool_choice != "none"
        if not req.stream:
            _, events, last = await collect(state, job)
            output = chat_output(state.adapter, state.tokenizer, prompt_text, tools, params.stop)
            parts = [output.feed(e) for e in events] + [output.finish()]
            reasoning = "".join(p.reasoning for p in parts)
            content = "".join(p.content for p in parts)
            calls = output.calls
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = tool_calls_json(calls)
            finish = "tool_calls" if calls else last.finish_reason
            body = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                 "logprobs": chat_logprobs(state.tokenizer, events)
                                 if req.logprobs else None}],
                    "usage": usage(last.stats or GenerationStats())}  # fmt: skip
            return JSONResponse(body)
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def pieces() -> AsyncIterator[str]:
            yield chunk(cid, model, created, {"role": "assistant", "content": ""}, None)
            output = chat_output(state.adapter, state.tokenizer, prompt_text, tools, params.stop)
            async for event in job.stream():
                delta = output.feed(event)
                if event.finish_reason is not None:
                    tail = output.finish()
                    delta = Delta(delta.reasoning + tail.reasoning, delta.content + tail.content)
                if delta.reasoning:
                    yield chunk(cid, model, created, {"reasoning_content": delta.reasoning}, None)
                logprobs = chat_logprobs(state.tokenizer, [event]) if req.logprobs else None
                if delta.content or (logprobs and logprobs["content"]):
                    yield chunk(cid, model, created, {"content": delta.content}, None, logprobs)
                if event.finish_reason is None:
                    continue
                record(state, event.stats)
                finish: str = event.finish_reason
                if output.calls:
                    calls_delta = {"tool_calls": tool_calls_json(output.calls)}
                    yield chunk(cid, model, created, calls_delta, None)
                    finish = "tool_calls"
                yield chunk(cid, model, created, {}, finish)
                if include_usage and event.stats is not None:
                    yield usage_chunk(cid, "chat.completion.chunk", created, model, event.stats)

        return await sse(state, job, pieces)

    async def completions(request: Request) -> Response:
        req = parse.decode_body(await read_body(request, state), CompletionRequest)
        parse.check_model(state, req.model)
        prompt = parse.completion_prompt(state, req)
        if req.logprobs is not None and not 0 <= req.logprobs <= 5:
            raise APIError(400, "logprobs must be between 0 and 5", param="logprobs")
        params = parse.sampling(state, req, prompt, req.max_tokens or 16, req.logprobs)
        job = start_job(state, prompt, params)
        cid, created, model = new_id("cmpl"), now(), state.model_id
        echo = state.tokenizer.decode(prompt) if req.echo else ""

        def body(text: str, finish: str | None, events: list[TokenEvent]) -> dict[str, Any]:
            logprobs = completion_logprobs(state.tokenizer, events) if req.logprobs is not None \
                else None  # fmt: skip
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": logprobs}]}  # fmt: skip

        if not req.stream:
            text, events, last = await collect(state, job)
            result = body(echo + text, last.finish_reason, events)
            result["usage"] = usage(last.stats or GenerationStats())
            return JSONResponse(result)
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def pieces() -> AsyncIterator[str]:
            if echo:
                yield f"data: {json.dumps(body(echo, None, []))}\n\n"
            async for event in job.stream():
                if event.text or event.finish_reason is not None:
                    yield f"data: {json.dumps(body(event.text, event.finish_reason, [event]))}\n\n"
                if event.finish_reason is not None:
                    record(state, event.stats)
                    if include_usage and event.stats is not None:
                        yield usage_chunk(cid, "text_completion", created, model, event.stats)

        return await sse(state, job, pieces)

    async def models(request: Request) -> Response:
        entry = {"id": state.model_id, "object": "model", "created": state.created,
                 "owned_by": "mach"}  # fmt: skip
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": state.model_id,
                             "queue_depth": state.worker.depth})  # fmt: skip

    async def metrics(request: Request) -> Response:
        text = state.metrics.render(state.worker.depth, state.store_stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def capabilities(request: Request) -> Response:
        return JSONResponse({
            "object": "capabilities",
            "model": state.model_id,
            "server": {
                "endpoints": ["/v1/chat/completions", "/v1/completions", "/v1/models",
                              "/v1/capabilities", "/health", "/metrics"],
                "streaming": True, "tools": True, "logprobs": True,
                "response_format": ["text", "json_object (best effort)"],
                "context_length": state.context_length,
                "max_queue": state.worker.max_queue,
                "continuous_batching": available("continuous_batching"),
                "speculative_decoding": type(state.worker.engine).__name__ == "SpecDecEngine",
                "prefix_cache": available("prefix_reuse"), "expert_store": state.store.kind,
            },
            "arch": arch_summary(state.adapter),
            "checkpoint": state.checkpoint,
        })  # fmt: skip

    routes = [
        route("chat/completions", chat, ["POST"]),
        route("completions", completions, ["POST"]),
        route("models", models, ["GET"]),
        route("capabilities", capabilities, ["GET"]),
        route("health", health, ["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins,
                                     allow_methods=["*"], allow_headers=["*"]))  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(state.worker.shutdown)

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
