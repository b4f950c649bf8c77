"""Request bodies to msgspec structs, with 400s that name the field at fault."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from mach_serve.errors import APIError

T = TypeVar("T")

# Strings (escapes included) and structural characters: enough to follow the nesting.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)
# An escaped UTF-16 surrogate without its partner: JSON allows it, Unicode text does not.
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_AT_BYTE = re.compile(r"\(byte (\d+)\)")
PATH_PARTS = 4
DEEP = 100


def decode_body(body: bytes, kind: type[T]) -> T:
    """``body`` as ``kind``, or an :class:`APIError` whose ``param`` locates the problem."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        at = _AT_PATH.search(str(exc))
        param = (at[1] or None) if at else None
        raise APIError(400, f"invalid request: {exc}", param=param) from None
    except msgspec.DecodeError as exc:
        raise _malformed(body, str(exc)) from None
    except UnicodeDecodeError:
        raise _not_utf8(body) from None
    except RecursionError:
        path = path_at(body, depth=DEEP)
        raise APIError(400, f"the request body nests JSON too deeply (under {path}); flatten "
                       "it", param=path) from None  # fmt: skip


def _malformed(body: bytes, reason: str) -> APIError:
    lone = _LONE_SURROGATE.search(body)
    if lone is not None:
        path = path_at(body, offset=lone.start(1))
        escape = lone[1].decode()
        return APIError(400, f"{path} holds the escape {escape}, half of a UTF-16 surrogate pair; "
                        "strings must be valid Unicode", param=path)  # fmt: skip
    at = _AT_BYTE.search(reason)
    path = path_at(body, offset=int(at[1])) if at else None
    where = f" (in {path})" if path else ""
    return APIError(400, f"the request body is not valid JSON: {reason}{where}", param=path)


def _not_utf8(body: bytes) -> APIError:
    try:
        body.decode()
    except UnicodeDecodeError as exc:
        path = path_at(body, offset=exc.start)
        return APIError(400, f"{path} is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset "
                        f"{exc.start}); send text as UTF-8", param=path)  # fmt: skip
    return APIError(400, "the request body is not valid UTF-8")


@dataclass
class _Level:
    """One open container while following the nesting: an object's key or an array's index."""

    is_object: bool
    key: str | None = None
    index: int = 0

    def part(self) -> str | None:
        if self.is_object:
            return None if self.key is None else f".{self.key}"
        return f"[{self.index}]"


def path_at(body: bytes, offset: int | None = None, depth: int | None = None) -> str | None:
    """Where in the JSON ``body`` byte ``offset`` lies, as ``messages[0].content``.

    With ``depth``, where nesting first goes deeper than that. The path is cut to its first
    :data:`PATH_PARTS` parts; ``None`` means the top level.
    """
    stack: list[_Level] = []
    for token in _TOKENS.finditer(body):
        if offset is not None and token.start() > offset:
            break
        text = token[0]
        if text in (b"{", b"["):
            if depth is not None and len(stack) >= depth:
                break
            stack.append(_Level(is_object=text == b"{"))
        elif text in (b"}", b"]"):
            if stack:
                stack.pop()
        elif not stack:
            continue
        elif text == b",":
            stack[-1].key, stack[-1].index = None, stack[-1].index + 1
        elif stack[-1].is_object and stack[-1].key is None:
            stack[-1].key = text[1:-1].decode("utf-8", "replace")
    parts = [part for level in stack if (part := level.part()) is not None]
    if not parts:
        return None
    path = "".join(parts[:PATH_PARTS]).lstrip(".")
    return path + ("..." if len(parts) > PATH_PARTS else "")
