"""``ModelWorker``: the one thread that owns the model; requests queue to it in order."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mach.decode.engine import DecodeEngine
from mach.decode.events import TokenEvent
from mach.decode.params import SamplingParams


class QueueFullError(RuntimeError):
    """The bounded request queue is full."""


class ShuttingDownError(RuntimeError):
    """The server is stopping and takes no new work."""


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def push(self, item: TokenEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Events as the worker produces them; cancels the job if the consumer goes away."""
        try:
            while True:
                item = await self.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancelled.set()


class ModelWorker:
    """Runs one generation at a time on its own thread; the event loop never waits on MLX.

    Jobs are served first come, first served from a queue of at most ``max_queue`` waiting jobs.
    A cancelled job stops at its next token.
    """

    def __init__(self, engine: DecodeEngine, max_queue: int = 32) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._busy = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mach-model-worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        return self._jobs.qsize() + int(self._busy)

    def submit(self, job: Job) -> None:
        if self._closing:
            raise ShuttingDownError("the server is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"{self.max_queue} requests are already waiting") from None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self._busy = True
            try:
                for event in self.engine.stream(job.prompt, job.params):
                    job.push(event)
                    if job.cancelled.is_set():
                        break
            except Exception as exc:  # reported to the request that caused it
                job.push(exc)
            finally:
                self._busy = False

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, let the running one finish."""
        self._closing = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.push(ShuttingDownError("the server is shutting down"))
        self._jobs.put(None)
        self._thread.join(timeout)
