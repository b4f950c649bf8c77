"""``mach chat``: talk to a model turn by turn, each turn starting from the last one's cache."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from mach.decode.engine import DecodeEngine
    from mach.decode.events import GenerationStats
    from mach.decode.params import SamplingParams
    from mach.io.options import LoadOptions
    from mach.tokenizer.tokenizer import Tokenizer

from mach.cli import reports_errors
from mach.cli.generate import choose_model
from mach.cli.residency import Draft, DraftTokens, Quiet, load_model, takes_load_options
from mach.cli.sampling import takes_sampling_options
from mach.errors import MachError

HELP = """\
Type a message and press Enter. A line ending in \\ continues on the next line; a line holding
only \"\"\" starts a block that runs to the next such line.
  /system TEXT   set the system message (and start over); /system alone removes it
  /reset         start a new conversation (the system message stays)
  /help          show this
  /exit          leave (so does Ctrl-D); Ctrl-C stops a reply that is being written"""
BLOCK = '"""'


class Conversation:
    """The messages so far and the system message that heads them."""

    def __init__(self, system: str | None) -> None:
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns = []


class LineReader:
    """Lines from stdin: through ``input`` (line editing and history with readline) on a
    terminal, plainly and without prompts otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdin.isatty()
        if self.tty:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401 - importing it gives input() editing and history

    def line(self, prompt: str) -> str | None:
        """The next line without its newline; ``None`` at the end of input."""
        if self.tty:
            try:
                return input(prompt)
            except EOFError:
                return None
        text = sys.stdin.readline()
        return None if not text else text.rstrip("\n")

    def message(self) -> str | None:
        """One message, joined over continued lines and blocks; ``None`` at the end of input."""
        first = self.line(">>> ")
        if first is None:
            return None
        if first.strip() == BLOCK:
            lines: list[str] = []
            while (line := self.line("... ")) is not None and line.strip() != BLOCK:
                lines.append(line)
            return "\n".join(lines)
        lines, line = [], first
        while line.endswith("\\"):
            lines.append(line[:-1])
            following = self.line("... ")
            if following is None:
                break
            line = following
        else:
            lines.append(line)
        return "\n".join(lines)


def turn_line(stats: GenerationStats, finish: str) -> str:
    return (
        f"[{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s, "
        f"first token {stats.time_to_first_token * 1000:.0f} ms, prompt "
        f"{stats.prompt_tokens} tokens ({stats.cached_tokens} cached) | finish: {finish}]"
    )


def reply(
    engine: DecodeEngine,
    tokenizer: Tokenizer,
    conversation: Conversation,
    params: SamplingParams,
    write: Callable[[str], Any],
) -> str:
    """Generate the assistant's next message, writing it as it comes; Ctrl-C ends it early."""
    prompt = tokenizer.apply_chat_template(conversation.messages())
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    parts: list[str] = []
    stream = engine.stream(tokens, params)
    try:
        for event in stream:
            if event.text:
                parts.append(event.text)
                write(event.text)
            if event.finish_reason is not None and event.stats is not None:
                write("\n")
                typer.echo(turn_line(event.stats, event.finish_reason), err=True)
    except KeyboardInterrupt:
        if isinstance(stream, Generator):
            stream.close()  # when interrupted between tokens; else it has ended already
        write("\n")
        typer.echo("[stopped]", err=True)
    return "".join(parts)


def command(text: str, conversation: Conversation) -> bool:
    """Carry out a ``/`` command; ``False`` when it asks to leave."""
    name, _, argument = text.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        conversation.reset()
        typer.echo("[new conversation]", err=True)
    elif name == "/system":
        conversation.system = argument.strip() or None
        conversation.reset()
        shown = "removed" if conversation.system is None else "set"
        typer.echo(f"[system message {shown}; new conversation]", err=True)
    elif name == "/help":
        typer.echo(HELP, err=True)
    else:
        typer.echo(f"[unknown command {name}; /help lists them]", err=True)
    return True


@reports_errors
@takes_load_options
@takes_sampling_options(max_tokens=512)
def chat_command(
    model: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Argument(
            help="Checkpoint folder or hub id (fetched when not in the local HF cache). "
            "Omit to use the embedded default model."
        ),
    ] = None,
    system: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="System message that opens the conversation."),
    ] = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = None,
    prompt_cache_bytes: Annotated[
        str, typer.Option(help="Memory for the prompt prefixes reused across turns, e.g. 1GB.")
    ] = "2GiB",
    quiet: Quiet = False,
    *,
    options: LoadOptions,
    params: SamplingParams,
) -> None:
    """Chat with a model: each turn streams its reply and reuses the cache of the turns before.

    A line ending in \\ continues the message; a line holding only \"\"\" opens and closes a
    block. /help lists the commands.
    """
    from mach.cache.prefix import PrefixCache
    from mach.decode.select import build_engine
    from mach.experts.bank import parse_size

    memory = parse_size(prompt_cache_bytes, "--prompt-cache-bytes")
    path, options = choose_model(model, options, quiet)
    loaded = load_model(path, options, quiet)
    tokenizer = loaded.tokenizer
    if tokenizer is None or tokenizer.chat_template is None:
        missing = "tokenizer.json" if tokenizer is None else "a chat template"
        raise MachError(
            f"{path}: {missing} is missing, so there is no chat format; use mach generate "
            "--prompt for raw text"
        )
    engine = build_engine(loaded, draft, draft_tokens, PrefixCache.for_model(loaded, memory))
    conversation = Conversation(system)
    reader = LineReader()
    if reader.tty:
        typer.echo("/help for commands, /exit or Ctrl-D to leave", err=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            text = reader.message()
        except KeyboardInterrupt:
            typer.echo("\n[/exit or Ctrl-D to leave]", err=True)
            continue
        if text is None:
            break
        if text.startswith("/") and "\n" not in text:
            if not command(text.strip(), conversation):
                break
            continue
        if not text.strip():
            continue
        conversation.turns.append({"role": "user", "content": text})
        answer = reply(engine, tokenizer, conversation, params, write)
        conversation.turns.append({"role": "assistant", "content": answer})


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)
