"""One request's job, from the queue to the client: disconnects, shutdown and outcomes.

Every job ends with exactly one outcome in the metrics: completed, cancelled (the client left,
while queued or running), failed (an error, or the shutdown grace period ran out) or rejected
(refused before it started: queue full, or the server stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from mach.decode.events import TokenEvent
from mach_serve.errors import APIError, internal_error
from mach_serve.metrics import Outcome
from mach_serve.state import ServerState
from mach_serve.worker import (
    ClientGoneError,
    GraceExpiredError,
    Job,
    QueueFullError,
    ShuttingDownError,
)

logger = logging.getLogger("mach_serve")
T = TypeVar("T")


def outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, ClientGoneError | asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, QueueFullError | ShuttingDownError):
        return "rejected"
    return "failed"


def api_error(exc: BaseException) -> APIError:
    """What the client is told about a job that did not complete."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, f"server busy: {exc}; retry shortly", kind="server_error",
                        code="overloaded", headers={"Retry-After": "1"})  # fmt: skip
    if isinstance(exc, ShuttingDownError | GraceExpiredError):
        return APIError(503, str(exc), kind="server_error", code="shutting_down")
    return internal_error()


async def _watch(request: Request, jobs: list[Job]) -> None:
    # Once the body is read, uvicorn's receive() returns only when the client disconnects.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.abandon()


@contextlib.asynccontextmanager
async def submitted(state: ServerState, request: Request, jobs: list[Job]) -> AsyncIterator[None]:
    """Queue ``jobs`` (a request's choices) while watching for the client to leave; counts the
    request's outcome if it ends here.

    The watch stops when the block exits, before a response is sent: a completed response
    also wakes ``receive()``.
    """
    watch = asyncio.create_task(_watch(request, jobs))
    try:
        await asyncio.sleep(0)  # let the watch see a client that left during preparation
        for job in jobs:
            if not job.cancelled.is_set():
                state.worker.submit(job)
                state.metrics.prompt_tokens += len(job.prompt)
        yield
    except BaseException as exc:
        for job in jobs:
            job.cancelled.set()  # nobody will read the rest
        state.metrics.outcomes[outcome_of(exc)] += 1
        if isinstance(exc, ClientGoneError | asyncio.CancelledError):
            raise
        raise api_error(exc) from None
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def each(awaitables: list[Coroutine[Any, Any, T]]) -> list[T]:
    """All results, in order; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _all_events(job: Job) -> list[TokenEvent]:
    return [event async for event in job.stream()]


async def run_to_end(
    state: ServerState, request: Request, jobs: list[Job]
) -> list[list[TokenEvent]]:
    """Every event of each non-streaming job; each list's last event has the finish reason."""
    async with submitted(state, request, jobs):
        runs = await each([_all_events(job) for job in jobs])
    state.metrics.outcomes["completed"] += 1
    for events in runs:
        record_stats(state, events[-1])
    return runs


async def first_events(state: ServerState, request: Request, jobs: list[Job]) -> list[TokenEvent]:
    """The first event of each streaming job: until they come, errors are still HTTP statuses."""
    async with submitted(state, request, jobs):
        return await each([job.next() for job in jobs])


async def rest(first: TokenEvent, job: Job) -> AsyncIterator[TokenEvent]:
    """``first`` and the job's events after it."""
    yield first
    if first.finish_reason is None:
        async for event in job.stream():
            yield event


async def merged(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The items of every stream as each produces them (a request's choices interleaved)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        left = len(tasks)
        while left:
            got = await queue.get()
            if got is None:
                left -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()


def record_stats(state: ServerState, last: TokenEvent) -> None:
    """Count a finished request in the metrics and log one line about it."""
    stats = last.stats
    if stats is None:
        return
    state.metrics.last_generation_tps = stats.generation_tps
    draft = f", {stats.acceptance_length:.2f} tokens/pass" if stats.verify_passes else ""
    logger.info(
        "request done: %d prompt tokens (%d cached), %d generated, first token after %.3f s, "
        "%.1f tok/s%s, finish %s",
        stats.prompt_tokens, stats.cached_tokens, stats.generation_tokens,
        stats.time_to_first_token, stats.generation_tps, draft, last.finish_reason,
    )  # fmt: skip


def sse(state: ServerState, jobs: list[Job], pieces: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events from ``pieces``, always closed by ``[DONE]`` unless the client left."""

    async def body() -> AsyncIterator[str]:
        outcome: Outcome = "cancelled"
        try:
            async for piece in pieces:
                yield piece
            outcome = "completed"
        except Exception as exc:  # the stream has started: report in-band, then end
            outcome = outcome_of(exc)
            yield f"data: {json.dumps(api_error(exc).body())}\n\n"
        finally:
            state.metrics.outcomes[outcome] += 1
            for job in jobs:
                job.cancelled.set()
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
