"""Keeping web pages from driving a local server: a Host allow-list and JSON-only POSTs.

A page in the user's browser can send "simple" cross-site requests (``text/plain`` bodies,
no preflight) to 127.0.0.1, and through DNS rebinding can even read the replies under its own
host name. Requiring a JSON content type forces a CORS preflight, and checking ``Host``
defeats rebinding.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from mach_serve.errors import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The ``Host`` names to answer when listening on ``bind``; ``None`` answers any.

    Loopback binds get the loopback names by default; ``extra`` adds names (and switches the
    list on for other binds), and ``*`` switches it off.
    """
    if "*" in extra:
        return None
    if extra or is_loopback(bind):
        return [*LOOPBACK_HOSTS, *(host.lower() for host in extra)]
    return None


def host_name(header: str) -> str:
    """``Host`` without its port, lowercased: ``[::1]:8000`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.partition(":")[0].rstrip(".")


class HostAllowList:
    """ASGI middleware answering 400 to any request whose ``Host`` is not on the list."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.hosts = frozenset(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(raw) not in self.hosts:
                shown = repr(raw) if raw else "missing"
                error = APIError(400, f"the Host header is {shown}, not a name this server "
                                 f"answers to ({', '.join(sorted(self.hosts))}); start it with "
                                 "--allowed-host NAME to add one", code="invalid_host")  # fmt: skip
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
        shown = repr(content_type) if content_type is not None else "missing"
        raise APIError(415, f"the Content-Type header is {shown}; send the body as "
                       "application/json", code="unsupported_media_type")  # fmt: skip
