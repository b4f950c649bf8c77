"""``ModelWorker``: the one thread that owns the model; requests queue to it in order."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.batch_sequence import BatchSequence
from mach.decode.engine import DecodeEngine
from mach.decode.events import TokenEvent
from mach.decode.params import SamplingParams

logger = logging.getLogger("mach_serve")


class QueueFullError(RuntimeError):
    """The bounded request queue is full."""


class ShuttingDownError(RuntimeError):
    """The server is stopping: the job was refused, or dropped from the queue unstarted."""


class GraceExpiredError(RuntimeError):
    """The server stopped a running job because the shutdown grace period ran out."""


class ClientGoneError(Exception):
    """The client disconnected; nothing more will be delivered to it."""


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def push(self, item: TokenEvent | BaseException) -> None:
        """Hand an event (or the error that ended the job) to the request; any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancelled.set()

    def put_all(self, items: list[TokenEvent]) -> None:
        """Queue ``items`` for the request; on its event loop's thread."""
        for item in items:
            self.events.put_nowait(item)

    def abandon(self) -> None:
        """The client left: stop at the next token (or never start) and wake the handler."""
        self.cancelled.set()
        self.events.put_nowait(ClientGoneError("the client disconnected"))

    async def next(self) -> TokenEvent:
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Events as the worker produces them; cancels the job if the consumer goes away."""
        try:
            while True:
                event = await self.next()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancelled.set()


def deliver(ready: list[tuple[Job, list[TokenEvent]]]) -> None:
    """Hand each job its events with one wake-up per event loop, not one per event; any thread.

    A batched step makes an event for every running request at once, and each wake-up of the
    event loop costs the worker the interpreter lock for a while.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, list[TokenEvent]]]] = {}
    for job, events in ready:
        by_loop.setdefault(job.loop, []).append((job, events))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_each, items)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            for job, _ in items:
                job.cancelled.set()


def _put_each(items: list[tuple[Job, list[TokenEvent]]]) -> None:
    for job, events in items:
        job.put_all(events)


class ModelWorker:
    """Runs generations on its own thread; the event loop never waits on MLX.

    Jobs are served first come, first served from a queue of at most ``max_queue`` waiting jobs.
    A ``ContinuousBatchScheduler`` engine runs up to its ``max_batch`` jobs at once, taking the
    next waiting job whenever one leaves; any other engine runs one job at a time. A cancelled
    job stops at its next token; a cancelled waiting job never starts.
    """

    def __init__(self, engine: DecodeEngine, max_queue: int = 32) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.started = 0
        """Jobs that began generating (a skipped or drained job never counts)."""
        self.generated = 0
        """Tokens generated, cancelled and failed jobs included."""
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: set[Job] = set()
        self._deadline: float | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mach-model-worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting plus those running."""
        return len(self._waiting) + len(self._running)

    @property
    def draining(self) -> bool:
        """Shutdown has begun: no new jobs are taken."""
        return self._deadline is not None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._deadline is not None:
                raise ShuttingDownError("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                # Jobs whose clients left hold places until popped; free them first.
                self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._waiting.append(job)
            self._cond.notify()

    def drain(self, grace: float) -> None:
        """Stop taking jobs, answer the waiting ones, give the running one ``grace`` seconds."""
        with self._cond:
            deadline = time.monotonic() + grace
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.cancelled.set()
            job.push(ShuttingDownError("the server is shutting down; this request never started"))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Drain with no grace left, then stop the thread (waiting up to ``timeout`` s)."""
        self.drain(0.0)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self) -> Job | None:
        """The next waiting job that is still wanted, now counted as running (lock held)."""
        while self._waiting:
            job = self._waiting.popleft()
            if not job.cancelled.is_set():
                self._running.add(job)
                self.started += 1
                return job
        return None

    def _next_job(self) -> Job | None:
        with self._cond:
            while True:
                if (job := self._take()) is not None:
                    return job
                if self._stopped:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        if isinstance(self.engine, ContinuousBatchScheduler):
            self._run_batched(self.engine)
            return
        while (job := self._next_job()) is not None:
            try:
                self._generate(job)
            finally:
                with self._cond:
                    self._running.discard(job)

    def _run_batched(self, scheduler: ContinuousBatchScheduler) -> None:
        jobs: dict[BatchSequence, Job] = {}
        while True:
            with self._cond:
                while not (self._stopped or self._waiting or jobs):
                    self._cond.wait()
                if self._stopped and not jobs and not self._waiting:
                    return
                while len(jobs) < scheduler.max_batch and (job := self._take()) is not None:
                    try:
                        jobs[scheduler.add(job.prompt, job.params)] = job
                    except Exception as exc:  # a bad request fails alone
                        job.push(exc)
                        self._running.discard(job)
            expired = self._deadline is not None and time.monotonic() >= self._deadline
            for seq, job in jobs.items():
                if expired:
                    job.push(GraceExpiredError("the server shut down before this request finished"))
                if expired or job.cancelled.is_set():
                    seq.cancel()
            try:
                scheduler.step()
            except Exception as exc:  # reported to every request of the failed step
                logger.error("generation failed", exc_info=exc)
                scheduler.reset()
                for job in jobs.values():
                    job.push(exc)
            ready = []
            for seq, job in list(jobs.items()):
                events = seq.drain()
                self.generated += sum(e.token is not None for e in events)
                if events:
                    ready.append((job, events))
                if seq.done:
                    del jobs[seq]
                    with self._cond:
                        self._running.discard(job)
            deliver(ready)

    def _generate(self, job: Job) -> None:
        events = self.engine.stream(job.prompt, job.params)
        try:
            for event in events:
                if event.token is not None:
                    self.generated += 1
                job.push(event)
                if event.finish_reason is not None or job.cancelled.is_set():
                    return
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    job.push(GraceExpiredError("the server shut down before this request finished"))
                    return
        except Exception as exc:  # reported to the request that caused it
            logger.error("generation failed", exc_info=exc)
            job.push(exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:  # a generator: release its cache now, not at collection
                close()
