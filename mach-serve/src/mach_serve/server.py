"""Loading the model into a server and running it with uvicorn."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mach.decode.select import build_engine
from mach.errors import MachError
from mach.io.checkpoint import open_checkpoint
from mach.io.load import load_moe, resolve_model_path
from mach.registry import detect_arch
from mach_serve.state import ServerState
from mach_serve.worker import ModelWorker

API_KEY_ENV = "MACH_API_KEY"
DEFAULT_CONTEXT = 4096


def context_length(config: dict[str, Any]) -> int:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = config.get("max_position_embeddings") or (text or {}).get("max_position_embeddings")
    return int(value) if value else DEFAULT_CONTEXT


def build_state(
    model: str | os.PathLike[str] | None,
    *,
    arch: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 32,
    max_body_bytes: int = 4 * 2**20,
    load_options: dict[str, Any] | None = None,
    draft: bool | None = None,
    draft_tokens: int = 2,
) -> ServerState:
    """Load ``model`` (the embedded default when ``None``) and wrap it for serving.

    ``draft`` picks speculative decoding: ``None`` uses the family's draft when the checkpoint
    ships one, ``False`` never, ``True`` requires it.
    """
    if model is None:
        from mach.default_model import DEFAULT_MODEL_NAME, default_model_path

        path: Path = default_model_path()
        name = model_name or DEFAULT_MODEL_NAME
        options = {"dtype": "float32", **(load_options or {})}
    else:
        path = resolve_model_path(model)
        name = model_name or path.name
        options = dict(load_options or {})
    net, tokenizer, store, cache = load_moe(path, arch=arch, **options)
    if tokenizer is None:
        raise MachError(f"{path}: tokenizer.json is missing; the server needs it to read text")
    config = json.loads((path / "config.json").read_text())
    adapter = detect_arch(config, open_checkpoint(path).tensor_names, arch)
    engine = build_engine(net, tokenizer, cache, path, arch, draft, draft_tokens)
    from mach.check import check_checkpoint

    return ServerState(
        checkpoint=check_checkpoint(path, options.get("expert_budget")).to_dict(),
        model_id=name,
        tokenizer=tokenizer,
        adapter=adapter,
        store=store,
        worker=ModelWorker(engine, max_queue),
        context_length=context_length(config),
        api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=max_body_bytes,
    )


def run(state: ServerState, host: str, port: int, cors_origins: list[str] | None = None) -> None:
    """Serve until interrupted; in-flight requests get up to 30 s to finish on shutdown."""
    import uvicorn

    from mach_serve.app import create_app

    app = create_app(state, cors_origins)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
