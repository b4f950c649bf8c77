"""uvicorn's h11 protocol with a deadline on each request head.

uvicorn bounds a head's size (h11's incomplete-event limit) and idle keep-alive time, but not
how long a head may take to arrive: a client trickling header bytes, or connecting and sending
nothing, holds its connection (and a place under ``limit_concurrency``) for ever.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {
        "message": f"the request head did not arrive within {seconds:g} s",
        "type": "invalid_request_error", "param": None, "code": "timeout"}}).encode()  # fmt: skip
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


class HeaderTimeoutProtocol(H11Protocol):
    """Closes a connection, with a 408, when a request head takes over ``header_timeout`` s.

    The clock starts when the connection opens, and again with the first byte of each later
    request; uvicorn's keep-alive timeout covers the idle time between requests.
    """

    header_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._disarm()
        elif self._head_timer is None and (cycle is None or cycle.response_complete):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout))
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to hand uvicorn (its ``http`` setting) for a ``seconds`` deadline."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})
