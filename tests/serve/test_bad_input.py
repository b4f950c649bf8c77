"""Every kind of bad request gets OpenAI's error object with a clear message; nothing crashes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.serve.conftest import Running, serve_with

CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


def post(served: Running, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", timeout=60, **kwargs)  # type: ignore[arg-type]


def error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["message"] and body["type"]
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "body is empty"),
        (b"[1, 2]", "invalid request"),
        (b'{"messages": "hello"}', "invalid request"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "invalid request"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "invalid request"),
        (b'{"messages": [], "max_tokens": 5}', "messages must not be empty"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n must be between 1"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 17}', "n must be between 1"),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"bogus": 1}}',
         "invalid request"),
        (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, '
         b'"top_logprobs": 50}', "top_logprobs"),
    ],
)  # fmt: skip
def test_bad_chat_bodies(served: Running, body: bytes, fragment: str) -> None:
    response = post(served, CHAT, content=body, headers={"content-type": "application/json"})
    assert fragment in str(error(response, 400)["message"])


def test_prompt_longer_than_the_context(served: Running) -> None:
    long = "x = 1\n" * served.state.context_length
    response = post(served, CHAT, json={"messages": [{"role": "user", "content": long}]})
    assert error(response, 400)["code"] == "context_length_exceeded"


def test_unknown_model_is_404(served: Running) -> None:
    response = post(served, CHAT, json={"model": "gpt-9", "messages": OK_MESSAGES})
    body = error(response, 404)
    assert body["code"] == "model_not_found" and served.state.model_id in str(body["message"])


def test_oversized_body_is_413(served: Running) -> None:
    big = "x" * (served.state.max_body_bytes + 10)
    response = post(served, CHAT, json={"messages": [{"role": "user", "content": big}]})
    error(response, 413)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [({"prompt": ""}, "non-empty"), ({"prompt": ["a", "b"]}, "one prompt"),
     ({"prompt": [1, "x"]}, "list of token ids"), ({"prompt": [10**9]}, "out of the vocabulary"),
     ({"prompt": "x", "logprobs": 9}, "logprobs"), ({}, "invalid request")],
)  # fmt: skip
def test_bad_completion_bodies(served: Running, body: dict[str, object], fragment: str) -> None:
    assert fragment in str(error(post(served, "/v1/completions", json=body), 400)["message"])


def test_wrong_method_and_path_are_error_objects(served: Running) -> None:
    wrong = httpx.get(f"{served.url}{CHAT}")
    body = error(wrong, 405)
    assert body["code"] == "method_not_allowed" and "POST" in str(body["message"])
    assert wrong.headers["allow"] == "POST"
    missing = httpx.post(f"{served.url}/v1/nothing", json={})
    body = error(missing, 404)
    assert body["code"] == "not_found" and "/v1/chat/completions" in str(body["message"])


def raw(served: Running, body: bytes) -> httpx.Response:
    return post(served, CHAT, content=body, headers={"content-type": "application/json"})


MESSAGE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "%s"}]}'


@pytest.mark.parametrize("text", [b"caf\xe9", b"\xff\xfe", b"ok \xc3"])
def test_text_that_is_not_utf8_names_its_field(served: Running, text: bytes) -> None:
    body = error(raw(served, MESSAGE.replace(b"%s", text)), 400)
    assert body["param"] == "messages[1].content" and "UTF-8" in str(body["message"])


@pytest.mark.parametrize("escape", [rb"\ud800", rb"x\udc00y", rb"\ud800\u0041"])
def test_unpaired_surrogate_escapes_name_their_field(served: Running, escape: bytes) -> None:
    body = error(raw(served, MESSAGE.replace(b"%s", escape)), 400)
    assert body["param"] == "messages[1].content" and "surrogate" in str(body["message"])


def test_paired_surrogate_escapes_are_text(served: Running) -> None:
    body = MESSAGE.replace(b"%s", rb"\ud83d\ude00")[:-1] + b', "max_tokens": 2}'
    assert raw(served, body).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [(b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"f": %s}]}', "tools[0].f"),
     (b'{"messages": %s}', "messages"), (b'{"stop": %s}', "stop")],
)  # fmt: skip
def test_json_nested_1000_deep_is_a_400(served: Running, body: bytes, param: str) -> None:
    deep = body.replace(b"%s", b"[" * 1000 + b"]" * 1000)
    found = error(raw(served, deep), 400)
    assert str(found["param"]).startswith(param)


@pytest.mark.parametrize("seed", [-1, 2**64, 10**30, -(2**70)])
def test_seed_out_of_range_is_a_400_without_binding_text(served: Running, seed: int) -> None:
    body = error(post(served, CHAT, json={"messages": OK_MESSAGES, "seed": seed}), 400)
    assert body["param"] == "seed" and "2**64" in str(body["message"])
    assert "incompatible" not in str(body["message"]) and "key(" not in str(body["message"])


def test_largest_seed_is_accepted(served: Running) -> None:
    body = {"messages": OK_MESSAGES, "seed": 2**64 - 1, "max_tokens": 2, "temperature": 0.7}
    assert post(served, CHAT, json=body).status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "many"), ("temperature", [1]), ("messages", {"role": "user"}),
     ("stream_options", {"include_usage": "yes"})],
)  # fmt: skip
def test_wrong_types_name_their_field(served: Running, field: str, value: object) -> None:
    body = {"messages": OK_MESSAGES, field: value}
    assert str(error(post(served, CHAT, json=body), 400)["param"]).startswith(field)


def test_no_filesystem_paths_in_capabilities(served: Running) -> None:
    from pathlib import Path

    from mach.default_model import default_model_path

    text = httpx.get(f"{served.url}/v1/capabilities").text
    for path in (default_model_path(), default_model_path().parent, Path.home()):
        assert json.dumps(str(path))[1:-1] not in text
    assert json.loads(text)["checkpoint"]["path"] == default_model_path().name


def test_server_still_healthy(served: Running) -> None:
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def guarded() -> Iterator[Running]:
    yield from serve_with(api_key="s3cret", cors_origins=["https://app.example"])


def test_api_key_is_required(guarded: Running) -> None:
    body = {"messages": OK_MESSAGES, "max_tokens": 2}
    assert error(post(guarded, CHAT, json=body), 401)["code"] == "invalid_api_key"
    wrong = post(guarded, CHAT, json=body, headers={"authorization": "Bearer nope"})
    error(wrong, 401)
    right = post(guarded, CHAT, json=body, headers={"authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_cors_is_off_by_default_and_configurable(served: Running, guarded: Running) -> None:
    headers = {"origin": "https://app.example", "access-control-request-method": "POST"}
    assert (
        "access-control-allow-origin"
        not in httpx.options(f"{served.url}{CHAT}", headers=headers).headers
    )
    allowed = httpx.options(f"{guarded.url}{CHAT}", headers=headers)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"


@pytest.fixture(scope="module")
def tiny_queue() -> Iterator[Running]:
    # Two requests decode together, one waits; the rest find the queue full.
    yield from serve_with(max_queue=1, max_batch=2)


def test_full_queue_is_503_with_retry_after(tiny_queue: Running) -> None:
    body = {"messages": OK_MESSAGES, "max_tokens": 400, "temperature": 0}
    statuses: list[httpx.Response] = []

    def call() -> None:
        statuses.append(post(tiny_queue, CHAT, json=body))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [r for r in statuses if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" for r in busy)
    assert any(r.status_code == 200 for r in statuses)
