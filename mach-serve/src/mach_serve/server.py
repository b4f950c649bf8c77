"""Loading the model into a server and running it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import uvicorn

from mach.cache.prefix import PrefixCache
from mach.check import CheckReport, fill_report
from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.compiled import compile_report
from mach.decode.engine import DecodeEngine
from mach.decode.followers import FollowedEngine, follow
from mach.decode.grammar import GrammarError, GrammarTokenizer
from mach.decode.select import batching_blocker, build_engine
from mach.errors import MachError
from mach.experts.parallel import expert_shard
from mach.io.load import LoadedModel, load_moe
from mach.io.options import LoadOptions
from mach.io.paths import resolve_model_path
from mach_serve.guards import allowed_hosts as hosts_for
from mach_serve.limits import HTTPLimits
from mach_serve.protocol import with_header_timeout
from mach_serve.state import ServerState
from mach_serve.worker import ModelWorker

API_KEY_ENV = "MACH_API_KEY"
DEFAULT_CONTEXT = 4096
DEFAULT_MAX_BATCH = 8
DEFAULT_PROMPT_CACHE_BYTES = 2 * 2**30
DEFAULT_PROMPT_CACHE_DISK_BYTES = 16 * 2**30
SHUTDOWN_BACKSTOP = 5
"""Seconds uvicorn waits past the grace period before cancelling what is left."""


def _served(
    model: str | os.PathLike[str] | None, model_name: str | None, options: LoadOptions | None
) -> tuple[Path, str, LoadOptions]:
    """The checkpoint folder, the name clients see and the load options of a server."""
    options = (options or LoadOptions()).with_defaults(prewarm=True)
    if model is None:
        from mach.default_model import DEFAULT_MODEL_NAME, default_model_path

        # Tiny enough that float32 costs nothing, and it matches the recorded reference.
        return (default_model_path(), model_name or DEFAULT_MODEL_NAME,
                options.with_defaults(dtype="float32"))  # fmt: skip
    path = resolve_model_path(model)
    return path, model_name or path.name, options


def follow_requests(
    model: str | os.PathLike[str] | None,
    *,
    options: LoadOptions | None = None,
    draft: bool | None = None,
    draft_tokens: int | None = None,
) -> NoReturn:
    """A rank other than 0 of ``mach serve`` under ``mlx.launch``: load as rank 0 does and
    generate, in lockstep, every request rank 0 takes, until ``mlx.launch`` stops it."""
    shard = expert_shard()
    if shard is None or shard.rank == 0:
        raise MachError("follow_requests runs on the ranks after the first under mlx.launch")
    path, _, options = _served(model, None, options)
    loaded = load_moe(path, options=options)
    assert loaded.shard is not None
    follow(build_engine(loaded, draft, draft_tokens, None, 1), loaded.shard)


def build_state(
    model: str | os.PathLike[str] | None,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 32,
    max_body_bytes: int = 4 * 2**20,
    body_timeout: float = 30.0,
    max_prompt_bytes: int = 2**20,
    max_prompt_tokens: int | None = None,
    options: LoadOptions | None = None,
    draft: bool | None = None,
    draft_tokens: int | None = None,
    prompt_cache_bytes: int | None = DEFAULT_PROMPT_CACHE_BYTES,
    prompt_cache_dir: str | os.PathLike[str] | None = None,
    prompt_cache_disk_bytes: int = DEFAULT_PROMPT_CACHE_DISK_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> ServerState:
    """Load ``model`` (the embedded default when ``None``) with ``options`` and wrap it.

    ``draft`` picks speculative decoding: ``None`` uses the family's draft when the checkpoint
    ships one and requests cannot batch, ``False`` never, ``True`` requires it (and serves one
    request at a time). Prompt prefixes are reused across requests
    from ``prompt_cache_bytes`` of memory (``None`` turns reuse off) and, with
    ``prompt_cache_dir``, from a disk tier of ``prompt_cache_disk_bytes`` that outlives the
    process. Up to ``max_batch`` requests decode together where the architecture's cache can
    batch and no draft was asked for; otherwise requests run one at a time, and the capability
    report says why. ``progress(done, total)`` follows the bytes of weights read.
    """
    path, name, options = _served(model, model_name, options)
    shard = expert_shard()
    if shard is not None:
        # Every rank must take the same passes: one request at a time, no prompt cache.
        prompt_cache_bytes, max_batch = None, 1
    loaded = load_moe(path, options=options, progress=progress)
    if loaded.tokenizer is None:
        raise MachError(f"{path}: tokenizer.json is missing; the server needs it to read text")
    with contextlib.suppress(GrammarError):
        # Reading every token's bytes takes about a second at 150k tokens: do it before the
        # first structured request rather than during it. Requests report what is missing.
        GrammarTokenizer.of(loaded.tokenizer)
    prefix_cache = None
    if prompt_cache_bytes is not None:
        prefix_cache = PrefixCache.for_model(loaded, prompt_cache_bytes, prompt_cache_dir,
                                             prompt_cache_disk_bytes)  # fmt: skip
    engine = build_engine(loaded, draft, draft_tokens, prefix_cache, max_batch)
    if shard is not None:
        engine = FollowedEngine(engine, shard)
    report = CheckReport(str(path))
    fill_report(report, loaded.plan)
    return ServerState(
        checkpoint=without_paths(report.to_dict(), path),
        model_id=name,
        tokenizer=loaded.tokenizer,
        adapter=loaded.adapter,
        store=loaded.store,
        worker=ModelWorker(engine, max_queue),
        context_length=loaded.checkpoint.context_length or DEFAULT_CONTEXT,
        api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
        max_prompt_bytes=max_prompt_bytes,
        max_prompt_tokens=max_prompt_tokens,
        prefix_cache=prefix_cache,
        sequential_reason=_sequential_reason(engine, loaded, max_batch),
        decode_passes=compile_report(
            loaded.passes, loaded.cache, batched=isinstance(engine, ContinuousBatchScheduler)
        ),
    )


def _sequential_reason(engine: DecodeEngine, loaded: LoadedModel, max_batch: int) -> str | None:
    """Why requests run one at a time on ``engine``, or ``None`` when they batch."""
    if isinstance(engine, ContinuousBatchScheduler):
        return None
    if loaded.shard is not None:
        return (f"{loaded.shard.describe()} decodes one sequence at a time, with no prompt "
                "cache, in this version")  # fmt: skip
    if max_batch == 1:
        return "--max-batch is 1"
    blocker = batching_blocker(loaded)
    if blocker is not None:
        return blocker
    return (
        "speculative decoding (--draft) decodes one sequence at a time; serve without it to batch"
    )


def without_paths(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """``report`` with the checkpoint's folder named only by its last part.

    Clients see this at ``/v1/capabilities``; where the files live (and the user's name in a
    home folder) is the server's business.
    """
    text = json.dumps(report)
    for prefix, shown in ((str(path.resolve()), path.name), (str(path), path.name),
                          (str(Path.home()), "~")):  # fmt: skip
        text = text.replace(json.dumps(prefix)[1:-1], json.dumps(shown)[1:-1])
    result: dict[str, Any] = json.loads(text)
    return result


class MachServer(uvicorn.Server):
    """uvicorn's server, which also drains the model worker the moment shutdown begins.

    uvicorn alone would let queued requests start during its grace period and then cut them
    off; draining answers them 503 at once and gives the running one the grace period.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float) -> None:
        super().__init__(config)
        self.state, self.grace = state, grace
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the loop thread inside the worker's lock; the drain
        # runs as a loop callback instead.
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self.state.worker.drain, self.grace)
        super().handle_exit(sig, frame)


def make_server(
    state: ServerState,
    host: str,
    port: int,
    *,
    limits: HTTPLimits | None = None,
    cors_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
    log_level: str = "info",
) -> MachServer:
    """The uvicorn server for ``state``; ``allowed_hosts`` adds to the loopback names."""
    from mach_serve.app import create_app

    limits = limits or HTTPLimits()
    app = create_app(state, cors_origins, hosts_for(host, allowed_hosts or []))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=with_header_timeout(limits.header_timeout),
        timeout_keep_alive=limits.keep_alive,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=limits.limit_concurrency,
        timeout_graceful_shutdown=math.ceil(limits.shutdown_grace) + SHUTDOWN_BACKSTOP,
    )
    return MachServer(config, state, limits.shutdown_grace)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MachError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or "
            "stop what is using it"
        ) from exc
    sock.listen(2048)
    return sock


def run(
    state: ServerState,
    host: str,
    port: int,
    cors_origins: list[str] | None = None,
    *,
    limits: HTTPLimits | None = None,
    allowed_hosts: list[str] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (see :class:`MachServer`).

    ``sock`` is a socket from :func:`bind`; without one, uvicorn binds ``host:port`` itself.
    """
    server = make_server(state, host, port, limits=limits, cors_origins=cors_origins,
                         allowed_hosts=allowed_hosts)  # fmt: skip
    server.run(sockets=[sock] if sock is not None else None)
