"""A keyless server on loopback answers only its own names, and only JSON bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from mach_serve.guards import allowed_hosts, host_name
from tests.serve.conftest import Running, serve_with
from tests.serve.raw import call

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def status_for_host(served: Running, host: str) -> tuple[int, dict[str, object]]:
    status, _, body = call(served.port, "GET", "/v1/models", headers={"Host": host})
    return status, json.loads(body)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}",
                                  "LOCALHOST", "localhost."])  # fmt: skip
def test_loopback_names_are_answered(served: Running, host: str) -> None:
    assert status_for_host(served, host.format(port=served.port))[0] == 200


@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1.nip.io",
                                  "localhost.evil.example:{port}"])  # fmt: skip
def test_other_names_are_refused(served: Running, host: str) -> None:
    status, body = status_for_host(served, host.format(port=served.port))
    assert status == 400
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "invalid_host"
    assert "Host" in error["message"] and "--allowed-host" in error["message"]


def test_a_refused_host_reaches_no_endpoint(served: Running) -> None:
    before = sum(served.state.metrics.requests.values())
    status, _, _ = call(served.port, "POST", CHAT, BODY, headers={"Host": "evil.example"})
    assert status == 400 and sum(served.state.metrics.requests.values()) == before


@pytest.fixture(scope="module")
def with_extra_host() -> Iterator[Running]:
    yield from serve_with(allowed_hosts=["box.lan"])


def test_allowed_host_adds_a_name(with_extra_host: Running) -> None:
    assert status_for_host(with_extra_host, "box.lan:80")[0] == 200
    assert status_for_host(with_extra_host, "127.0.0.1")[0] == 200
    assert status_for_host(with_extra_host, "other.lan")[0] == 400


def test_allow_list_defaults() -> None:
    assert allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("::1") == allowed_hosts("localhost") == allowed_hosts("127.0.0.2")
    assert allowed_hosts("0.0.0.0") is None
    assert allowed_hosts("0.0.0.0", ["Box.Lan"]) == ["localhost", "127.0.0.1", "[::1]", "box.lan"]
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    assert host_name("[::1]:8000") == "[::1]" and host_name("Example.COM.:1") == "example.com"


@pytest.mark.parametrize(
    "content_type", ["", "text/plain", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x", "application/jsonp"],
)  # fmt: skip
def test_posts_must_be_json(served: Running, content_type: str) -> None:
    headers = {"Content-Type": content_type}  # empty: no Content-Type at all
    status, _, body = call(served.port, "POST", CHAT, BODY, headers=headers)
    error = json.loads(body)["error"]
    assert status == 415 and error["code"] == "unsupported_media_type"
    assert "Content-Type" in error["message"]


def test_json_with_a_charset_is_json(served: Running) -> None:
    headers = {"Content-Type": "Application/JSON; charset=utf-8"}
    assert call(served.port, "POST", CHAT, BODY, headers=headers)[0] == 200
