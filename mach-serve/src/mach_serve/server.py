"""Loading the model into a server and running it with uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from mach.check import CheckReport, fill_report
from mach.decode.select import build_engine
from mach.errors import MachError
from mach.io.load import load_moe
from mach.io.options import LoadOptions
from mach.io.paths import resolve_model_path
from mach_serve.state import ServerState
from mach_serve.worker import ModelWorker

API_KEY_ENV = "MACH_API_KEY"
DEFAULT_CONTEXT = 4096


def build_state(
    model: str | os.PathLike[str] | None,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 32,
    max_body_bytes: int = 4 * 2**20,
    options: LoadOptions | None = None,
    draft: bool | None = None,
    draft_tokens: int = 2,
) -> ServerState:
    """Load ``model`` (the embedded default when ``None``) with ``options`` and wrap it.

    ``draft`` picks speculative decoding: ``None`` uses the family's draft when the checkpoint
    ships one, ``False`` never, ``True`` requires it.
    """
    options = options or LoadOptions()
    if model is None:
        from mach.default_model import DEFAULT_MODEL_NAME, default_model_path

        path: Path = default_model_path()
        name = model_name or DEFAULT_MODEL_NAME
        # Tiny enough that float32 costs nothing, and it matches the recorded reference.
        options = options.with_defaults(dtype="float32")
    else:
        path = resolve_model_path(model)
        name = model_name or path.name
    loaded = load_moe(path, options=options)
    if loaded.tokenizer is None:
        raise MachError(f"{path}: tokenizer.json is missing; the server needs it to read text")
    engine = build_engine(loaded, draft, draft_tokens)
    report = CheckReport(str(path))
    fill_report(report, loaded.plan)
    return ServerState(
        checkpoint=report.to_dict(),
        model_id=name,
        tokenizer=loaded.tokenizer,
        adapter=loaded.adapter,
        store=loaded.store,
        worker=ModelWorker(engine, max_queue),
        context_length=loaded.checkpoint.context_length or DEFAULT_CONTEXT,
        api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=max_body_bytes,
    )


def run(state: ServerState, host: str, port: int, cors_origins: list[str] | None = None) -> None:
    """Serve until interrupted; in-flight requests get up to 30 s to finish on shutdown."""
    import uvicorn

    from mach_serve.app import create_app

    app = create_app(state, cors_origins)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
