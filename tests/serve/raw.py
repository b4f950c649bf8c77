"""HTTP/1.1 over plain sockets, for clients no library will imitate: half-sent, rude, gone."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

TIMEOUT = 30.0


def request_bytes(
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    port: int = 0,
) -> bytes:
    data = json.dumps(body).encode() if isinstance(body, dict) else body or b""
    fields = {"Host": f"127.0.0.1:{port}"}
    if body is not None:
        fields |= {"Content-Type": "application/json", "Content-Length": str(len(data))}
    fields |= headers or {}  # an empty value leaves the field out
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()
                                                      if v)  # fmt: skip
    return (head + "\r\n").encode("latin-1") + data


def send(port: int, method: str, path: str, body: bytes | dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> socket.socket:  # fmt: skip
    """A connection that has sent one whole request and not read the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(request_bytes(method, path, body, headers, port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lowercased names) and body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def call(port: int, method: str, path: str, body: bytes | dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    with send(port, method, path, body, headers) as sock:
        return read_response(sock)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)
