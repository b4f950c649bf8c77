"""``Tokenizer``: ``tokenizer.json`` through ``tokenizers``, chat templates through jinja2."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from mach.errors import CheckpointError, CorruptCheckpointError
from mach.tokenizer.detokenizer import StreamingDetokenizer

TOKENIZER_FILE = "tokenizer.json"
LONG_TEXT = 2**14
"""Characters from which encoding releases the GIL (see :meth:`Tokenizer.encode`)."""


class ChatTemplateError(CheckpointError):
    """The checkpoint has no chat template, or rendering it failed."""


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class Tokenizer:
    """Encode, decode, render chat prompts and know which tokens end a turn."""

    def __init__(
        self,
        backend: Any,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] = (),
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.eos_token_ids = set(eos_token_ids)
        self.special_tokens = dict(special_tokens or {})
        self._template: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        """The id of a token string, or ``None``."""
        tid = self.backend.token_to_id(token)
        return None if tid is None else int(tid)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; other Python threads keep running while a long text is encoded.

        The backend's ``encode`` holds the GIL throughout (seconds for megabytes of text);
        ``encode_batch`` gives it up, so long texts go through a batch of one.
        """
        if len(text) < LONG_TEXT:
            return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        [encoding] = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generation."""
        return StreamingDetokenizer(self.decode)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages with the checkpoint's own chat template."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this checkpoint has no chat template (tokenizer_config.json 'chat_template' "
                "or chat_template.jinja); use a plain prompt instead"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        context = {**self.special_tokens, **kwargs}
        try:
            return str(
                self._template.render(
                    messages=list(messages),
                    tools=list(tools) if tools else None,
                    add_generation_prompt=add_generation_prompt,
                    **context,
                )
            )
        except ChatTemplateError:
            raise
        except Exception as exc:
            raise ChatTemplateError(f"the chat template failed to render: {exc}") from exc


def _compile_template(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template rejected the messages: {message}")

    def tojson(value: Any, indent: int | None = None, **kwargs: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=False)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not parse: {exc}") from exc


def _chat_template(root: Path, tok_config: Mapping[str, Any]) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def load_tokenizer(root: str | Path, config: Mapping[str, Any] | None = None) -> Tokenizer | None:
    """The checkpoint's tokenizer, or ``None`` when it has no ``tokenizer.json``."""
    from tokenizers import Tokenizer as Backend

    root = Path(root)
    path = root / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:
        raise CorruptCheckpointError(f"{path}: cannot be read by tokenizers ({exc})") from exc
    tok_config = _json(root / "tokenizer_config.json")
    generation = _json(root / "generation_config.json")
    special = {
        key: _token_content(tok_config.get(key))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    eos = set(_ids(generation.get("eos_token_id")))
    eos |= set(_ids((config or {}).get("eos_token_id")))
    eos_text = special.get("eos_token")
    if eos_text is not None:
        eos_id = backend.token_to_id(eos_text)
        if eos_id is not None:
            eos.add(int(eos_id))
    return Tokenizer(backend, _chat_template(root, tok_config), sorted(eos), special)
