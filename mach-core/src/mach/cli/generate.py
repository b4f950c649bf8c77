"""``mach generate``: one prompt in, streamed text out."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from mach.decode.params import SamplingParams
    from mach.io.options import LoadOptions

from mach.chat.reasoning import split_reasoning
from mach.cli import reports_errors
from mach.cli.download import model_folder
from mach.cli.residency import (
    Draft,
    DraftTokens,
    Quiet,
    load_model,
    store_line,
    store_report,
    takes_load_options,
)
from mach.cli.sampling import takes_sampling_options
from mach.errors import MachError

DEFAULT_PROMPT = "def fibonacci(n):"


def _stats_line(stats: dict[str, Any], finish: str) -> str:
    draft = (
        f" | draft: {stats['accepted_tokens']}/{stats['draft_tokens']} accepted, "
        f"{stats['acceptance_length']:.2f} tokens/pass"
        if stats.get("verify_passes")
        else ""
    )
    cached = f" ({stats['cached_tokens']} cached)" if stats.get("cached_tokens") else ""
    return (
        f"prompt: {stats['prompt_tokens']} tokens{cached}, {stats['prompt_tps']:.1f} tok/s | "
        f"generation: {stats['generation_tokens']} tokens, {stats['generation_tps']:.1f} tok/s | "
        f"peak memory: {stats['peak_memory_bytes'] / 1e9:.3f} GB{draft} | finish: {finish}"
    )


def choose_model(model: str | None, options: LoadOptions, quiet: bool) -> tuple[Path, LoadOptions]:
    """The folder to load for a ``MODEL`` argument and the options to load it with: the
    embedded default model (in float32, announced on stderr unless ``quiet``) when ``None``."""
    if model is not None:
        return model_folder(model, quiet), options
    from mach.default_model import DEFAULT_MODEL_NAME, default_model_path

    if not quiet:
        typer.echo(
            f"mach: default model {DEFAULT_MODEL_NAME} (qwen3_moe, 12.8M parameters, "
            "trained on Python's standard library)",
            err=True,
        )
    # Tiny enough that float32 costs nothing, and it matches the recorded reference.
    return default_model_path(), options.with_defaults(dtype="float32")


@reports_errors
@takes_load_options
@takes_sampling_options(max_tokens=128)
def generate_command(
    model: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Argument(
            help="Checkpoint folder or hub id (org/name; fetched when not in the local HF "
            "cache). Omit to use the embedded default model."
        ),
    ] = None,
    prompt: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Option("--prompt", "-p", help="Raw prompt text; - reads it from stdin."),
    ] = None,
    chat: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--chat", "-c", help="A user message for the chat template; - reads stdin."),
    ] = None,
    system: Annotated[
        Optional[str], typer.Option(help="System message for --chat.")  # noqa: UP045
    ] = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    prompt_cache_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Keep prompt-prefix snapshots in this folder and start from the longest one "
            "that matches (reused across runs of the same model)."
        ),
    ] = None,
    prompt_cache_disk_bytes: Annotated[
        str, typer.Option(help="Byte budget of --prompt-cache-dir, e.g. 16GB.")
    ] = "16GB",
    quiet: Quiet = False,
    *,
    options: LoadOptions,
    params: SamplingParams,
) -> None:
    """Generate text from a prompt with a MoE checkpoint."""
    from mach.decode.select import build_engine
    from mach.experts.parallel import collective_errors

    # "-" reads the text from standard input, so prompts can be piped in.
    if prompt == "-":
        prompt = sys.stdin.read()
    if chat == "-":
        chat = sys.stdin.read()
    if prompt is not None and chat is not None:
        raise ValueError("give either --prompt or --chat, not both")
    default_model = model is None
    path, options = choose_model(model, options, quiet or as_json)
    loaded = load_model(path, options, quiet)
    tokenizer, store = loaded.tokenizer, loaded.store
    if tokenizer is None:
        raise MachError(
            f"{path}: tokenizer.json is missing, so text cannot be encoded; copy the "
            "tokenizer files from the original checkpoint into this folder"
        )
    if chat is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": chat}
        ]
        prompt_text = tokenizer.apply_chat_template(messages)
        tokens = tokenizer.encode(prompt_text, add_special_tokens=False)
    else:
        prompt_text = prompt if prompt is not None else DEFAULT_PROMPT
        tokens = tokenizer.encode(prompt_text)

    prefix_cache = None
    if prompt_cache_dir is not None:
        from mach.cache.prefix import PrefixCache
        from mach.experts.bank import parse_size

        prefix_cache = PrefixCache.for_model(
            loaded,
            directory=prompt_cache_dir,
            disk_bytes=parse_size(prompt_cache_disk_bytes, "--prompt-cache-disk-bytes"),
        )
    engine = build_engine(loaded, draft, draft_tokens, prefix_cache)
    # Under mlx.launch every rank decodes in lockstep; rank 0 alone speaks.
    follower = loaded.shard is not None and loaded.shard.rank != 0
    with collective_errors(loaded.shard):
        if as_json:
            result = engine.generate(tokens, params)
            if follower:
                return
            shown = model if model is not None else str(path)
            payload = {**result.to_dict(), "model": shown, "default_model": default_model,
                       "ranks": 1 if loaded.shard is None else loaded.shard.size}  # fmt: skip
            if loaded.shard is not None:
                payload["parallel"] = loaded.shard.mode
            tags = loaded.adapter.reasoning_tags if chat is not None else None
            if tags is not None:
                started = prompt_text.rstrip().endswith(tags.open)
                payload["reasoning"], payload["content"] = split_reasoning(
                    result.text, tags, started
                )
            report = store_report(store.stats(), result.stats.prompt_tokens + len(result.tokens))
            if report:
                payload["experts"] = report
            typer.echo(json.dumps(payload))
            return
        for event in engine.stream(tokens, params):
            if follower:
                continue
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.finish_reason is not None and event.stats is not None:
                sys.stdout.write("\n")
                typer.echo(_stats_line(event.stats.to_dict(), event.finish_reason), err=True)
                total = event.stats.prompt_tokens + event.stats.generation_tokens
                report = store_report(store.stats(), total)
                if report:
                    typer.echo(store_line(report), err=True)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
