"""The starlette application: OpenAI-compatible routes over one model worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mach.capabilities import available
from mach.chat.tool_calls import TOOL_CALL_OPEN
from mach.decode.events import GenerationStats, TokenEvent
from mach.decode.followers import FollowedEngine
from mach.decode.structured import reply_format
from mach.registry import arch_summary
from mach_serve.delivery import first_events, merged, record_stats, rest, run_to_end, sse
from mach_serve.errors import APIError, internal_error
from mach_serve.guards import HostAllowList, require_json
from mach_serve.memory import LARGE_REQUEST_BYTES, release_freed_memory
from mach_serve.output import ChatOutput, Delta, chat_output
from mach_serve.requests import MAX_SEED, Prepared, prepare_chat, prepare_completion
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
from mach_serve.state import ServerState
from mach_serve.worker import ClientGoneError, Job

Handler = Callable[[Request], Any]
R = TypeVar("R")
logger = logging.getLogger("mach_serve")
CLIENT_CLOSED = 499
"""The status nginx logs for a client that left first; nobody receives it."""
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/capabilities",
             "/health", "/metrics"]  # fmt: skip


async def read_body(request: Request, state: ServerState) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise APIError(413, f"request body over {state.max_body_bytes} bytes", code="too_large")

    async def read() -> bytes:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > state.max_body_bytes:
                raise APIError(413, f"request body over {state.max_body_bytes} bytes",
                               code="too_large")  # fmt: skip
        return bytes(body)

    try:
        body = await asyncio.wait_for(read(), state.body_timeout)
    except ClientDisconnect:
        state.metrics.outcomes["cancelled"] += 1
        raise ClientGoneError("the client disconnected while sending its request") from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {state.body_timeout:g} s",
                       code="timeout", headers={"Connection": "close"}) from None  # fmt: skip
    request.state.body_bytes = len(body)
    return body


async def prepare(
    request: Request, state: ServerState, parse: Callable[[ServerState, bytes], R]
) -> R:
    """Read the body, then parse, template and tokenize it on the preparation threads."""
    body = await read_body(request, state)
    return await asyncio.get_running_loop().run_in_executor(state.prepare_pool, parse, state, body)


def create_app(
    state: ServerState,
    cors_origins: list[str] | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The application serving ``state``'s model.

    ``allowed_hosts``: the ``Host`` names answered (see :func:`mach_serve.guards.allowed_hosts`);
    ``None`` answers any.
    """

    def route(endpoint: str, handler: Handler, methods: list[str]) -> Route:
        async def answer(request: Request) -> Response:
            try:
                if state.api_key is not None and endpoint != "health":
                    expected = f"Bearer {state.api_key}"
                    if request.headers.get("authorization") != expected:
                        raise APIError(401, "missing or wrong API key: send Authorization: "
                                       "Bearer <key>", kind="authentication_error",
                                       code="invalid_api_key")  # fmt: skip
                if request.method == "POST":
                    require_json(request)
                response: Response = await handler(request)
                return response
            except APIError as exc:
                return exc.response()
            except ClientGoneError:
                return Response(status_code=CLIENT_CLOSED)
            except Exception as exc:  # nothing a client sends may take the server down
                logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
                return internal_error().response()

        async def wrapped(request: Request) -> Response:
            response = await answer(request)
            state.metrics.requests[(endpoint, response.status_code)] += 1
            if getattr(request.state, "body_bytes", 0) >= LARGE_REQUEST_BYTES:
                # After the response is sent, when nothing of the request is left alive.
                response.background = BackgroundTask(release_freed_memory)
            return response

        return Route(f"/{endpoint}" if endpoint == "health" else f"/v1/{endpoint}",
                     wrapped, methods=methods)  # fmt: skip

    def new_jobs(prepared: Prepared, n: int) -> list[Job]:
        """One job per choice; a seeded request's choice ``i`` draws with ``seed + i``."""
        loop, params = asyncio.get_running_loop(), prepared.params
        jobs = []
        for i in range(n):
            seed = None if params.seed is None else (params.seed + i) % (MAX_SEED + 1)
            choice = params if i == 0 else dataclasses.replace(params, seed=seed)
            jobs.append(Job(prepared.prompt, choice, loop))
        return jobs

    async def choices_then_usage(
        streams: list[AsyncIterator[str]],
        stats: list[GenerationStats],
        usage_piece: Callable[[], str] | None,
    ) -> AsyncIterator[str]:
        """Every choice's chunks as they come, then the usage chunk when asked for."""
        async for piece in merged(streams):
            yield piece
        if usage_piece is not None and stats:
            yield usage_piece()

    def finished(events: list[TokenEvent]) -> GenerationStats:
        return events[-1].stats or GenerationStats()

    async def chat(request: Request) -> Response:
        req, prepared = await prepare(request, state, prepare_chat)
        params, prompt_text = prepared.params, prepared.text
        jobs = new_jobs(prepared, req.n)
        cid, created, model = new_id("chatcmpl"), now(), state.model_id
        tools = bool(req.tools) and req.tool_choice != "none"

        def output() -> ChatOutput:
            return chat_output(state.adapter, state.tokenizer, prompt_text, tools, params.stop)

        def choice(index: int, events: list[TokenEvent]) -> dict[str, Any]:
            out = output()
            parts = [out.feed(e) for e in events] + [out.finish()]
            reasoning = "".join(p.reasoning for p in parts)
            content = "".join(p.content for p in parts)
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if reasoning:
                message["reasoning_content"] = reasoning
            if out.calls:
                message["tool_calls"] = tool_calls_json(out.calls)
            finish = "tool_calls" if out.calls else events[-1].finish_reason
            return {"index": index, "message": message, "finish_reason": finish,
                    "logprobs": chat_logprobs(state.tokenizer, events) if req.logprobs
                    else None}  # fmt: skip

        if not req.stream:
            runs = await run_to_end(state, request, jobs)
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                                 "model": model,
                                 "choices": [choice(i, events) for i, events in enumerate(runs)],
                                 "usage": usage(*(finished(e) for e in runs))})  # fmt: skip
        firsts = await first_events(state, request, jobs)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        stats: list[GenerationStats] = []

        async def choice_pieces(index: int, first: TokenEvent, job: Job) -> AsyncIterator[str]:
            def piece(delta: dict[str, Any], finish: str | None = None,
                      logprobs: dict[str, Any] | None = None) -> str:  # fmt: skip
                return chunk(cid, model, created, delta, finish, logprobs, index)

            yield piece({"role": "assistant", "content": ""})
            out = output()
            async for event in rest(first, job):
                delta = out.feed(event)
                if event.finish_reason is not None:
                    tail = out.finish()
                    delta = Delta(delta.reasoning + tail.reasoning, delta.content + tail.content)
                if delta.reasoning:
                    yield piece({"reasoning_content": delta.reasoning})
                logprobs = chat_logprobs(state.tokenizer, [event]) if req.logprobs else None
                if delta.content or (logprobs and logprobs["content"]):
                    yield piece({"content": delta.content}, None, logprobs)
                if event.finish_reason is None:
                    continue
                record_stats(state, event)
                stats.append(event.stats or GenerationStats())
                finish: str = event.finish_reason
                if out.calls:
                    yield piece({"tool_calls": tool_calls_json(out.calls)})
                    finish = "tool_calls"
                yield piece({}, finish)

        streams = [choice_pieces(i, first, job) for i, (first, job) in
                   enumerate(zip(firsts, jobs, strict=True))]  # fmt: skip
        usage_piece = (lambda: usage_chunk(cid, "chat.completion.chunk", created, model, stats)) \
            if include_usage else None  # fmt: skip
        return sse(state, jobs, choices_then_usage(streams, stats, usage_piece))

    async def completions(request: Request) -> Response:
        req, prepared = await prepare(request, state, prepare_completion)
        jobs = new_jobs(prepared, req.n)
        cid, created, model = new_id("cmpl"), now(), state.model_id
        echo = prepared.text

        def body(text: str, finish: str | None, events: list[TokenEvent],
                 index: int = 0) -> dict[str, Any]:  # fmt: skip
            logprobs = completion_logprobs(state.tokenizer, events) if req.logprobs is not None \
                else None  # fmt: skip
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "finish_reason": finish,
                                 "logprobs": logprobs}]}  # fmt: skip

        if not req.stream:
            runs = await run_to_end(state, request, jobs)
            choices = [body(echo + "".join(e.text for e in events), events[-1].finish_reason,
                            events, i)["choices"][0] for i, events in enumerate(runs)]  # fmt: skip
            result = body("", None, [])
            result["choices"] = choices
            result["usage"] = usage(*(finished(e) for e in runs))
            return JSONResponse(result)
        firsts = await first_events(state, request, jobs)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        stats: list[GenerationStats] = []

        async def choice_pieces(index: int, first: TokenEvent, job: Job) -> AsyncIterator[str]:
            if echo:
                yield f"data: {json.dumps(body(echo, None, [], index))}\n\n"
            async for event in rest(first, job):
                if event.text or event.finish_reason is not None:
                    piece = body(event.text, event.finish_reason, [event], index)
                    yield f"data: {json.dumps(piece)}\n\n"
                if event.finish_reason is not None:
                    record_stats(state, event)
                    stats.append(event.stats or GenerationStats())

        streams = [choice_pieces(i, first, job) for i, (first, job) in
                   enumerate(zip(firsts, jobs, strict=True))]  # fmt: skip
        usage_piece = (lambda: usage_chunk(cid, "text_completion", created, model, stats)) \
            if include_usage else None  # fmt: skip
        return sse(state, jobs, choices_then_usage(streams, stats, usage_piece))

    def model_entry() -> dict[str, Any]:
        return {"id": state.model_id, "object": "model", "created": state.created,
                "owned_by": "mach"}  # fmt: skip

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_entry()]})

    async def model(request: Request) -> Response:
        asked = request.path_params["model_id"]
        if asked != state.model_id:
            message = f"model {asked!r} is not served here; this server serves {state.model_id!r}"
            raise APIError(404, message, param="model", code="model_not_found")
        return JSONResponse(model_entry())

    async def health(request: Request) -> Response:
        draining = state.worker.draining
        return JSONResponse({"status": "shutting_down" if draining else "ok",
                             "model": state.model_id, "queue_depth": state.worker.depth},
                            status_code=503 if draining else 200)  # fmt: skip

    async def metrics(request: Request) -> Response:
        text = state.metrics.render(state.worker.depth, state.worker.generated,
                                    state.store_stats(), state.prefix_stats())  # fmt: skip
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _draft(engine: object, family: str | None) -> dict[str, Any] | bool:
        """The draft the engine decodes with (family, drafts per verify pass), or false."""
        if isinstance(engine, FollowedEngine):  # under mlx.launch: what rank 0 runs
            engine = engine.engine
        if type(engine).__name__ != "SpecDecEngine":
            return False
        return {"family": family, "draft_tokens": getattr(engine, "k", None)}

    def tool_choices(state: ServerState) -> list[str]:
        """The tool_choice values honoured: forced calls need a grammar for the call format."""
        fmt = reply_format(state.adapter, state.tokenizer.chat_template, "")
        forced = fmt.harmony or fmt.tool_call_open == TOOL_CALL_OPEN
        return ["none", "auto", "required", "function"] if forced else ["none", "auto"]

    async def capabilities(request: Request) -> Response:
        return JSONResponse({
            "object": "capabilities",
            "model": state.model_id,
            "server": {
                "endpoints": ENDPOINTS,
                "streaming": True, "tools": True, "logprobs": True,
                "response_format": ["text", "json_object", "json_schema"],
                "tool_choice": tool_choices(state),
                "context_length": state.context_length,
                "max_queue": state.worker.max_queue,
                "continuous_batching": state.sequential_reason is None,
                "max_batch": getattr(state.worker.engine, "max_batch", 1),
                "sequential_reason": state.sequential_reason,
                "speculative_decoding": _draft(state.worker.engine, state.adapter.specdec_kind),
                "prefix_cache": state.prefix_cache is not None and available("prefix_reuse"),
                "prefix_cache_disk": state.prefix_cache is not None
                and state.prefix_cache.disk is not None,
                "expert_store": state.store.kind,
                "decode_passes": state.decode_passes,
            },
            "arch": arch_summary(state.adapter),
            "checkpoint": state.checkpoint,
        })  # fmt: skip

    async def unrouted(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path, status = request.url.path, exc.status_code
        headers = dict(exc.headers) if exc.headers else None
        if status == 405:
            allowed = (headers or {}).get("Allow", "")
            error = APIError(405, f"{request.method} is not allowed on {path}; use {allowed}",
                             code="method_not_allowed", headers=headers)  # fmt: skip
        elif status == 404:
            error = APIError(404, f"no endpoint at {path}; this server has {', '.join(ENDPOINTS)}",
                             code="not_found")  # fmt: skip
        else:
            error = APIError(status, str(exc.detail), headers=headers)
        endpoint = path.removeprefix("/v1/").lstrip("/") if path in ENDPOINTS else "unrouted"
        state.metrics.requests[(endpoint, status)] += 1
        return error.response()

    routes = [
        route("chat/completions", chat, ["POST"]),
        route("completions", completions, ["POST"]),
        route("models", models, ["GET"]),
        route("models/{model_id:path}", model, ["GET"]),
        route("capabilities", capabilities, ["GET"]),
        route("health", health, ["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(HostAllowList, hosts=allowed_hosts))
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins,
                                     allow_methods=["*"], allow_headers=["*"]))  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(state.worker.shutdown)
        state.prepare_pool.shutdown(wait=False, cancel_futures=True)

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={HTTPException: unrouted})  # fmt: skip
