"""Hostile finding 13: a web page the user visits must not reach the node's HTTP API. Both faces and
/metrics answer only to a loopback Host (DNS rebinding), refuse a foreign Origin (cross-site
requests) and any body that is not JSON (a ``text/plain`` or form POST, which a browser sends
without a CORS preflight), and read at most 2 MiB nested at most 32 deep. Each refusal has one
status and code, in the shape of the face it was sent to, and the call behind it is never made.
"""

from __future__ import annotations

import json
import types

import pytest
from starlette.testclient import TestClient

from node.api import build_app
from node.api._http import MAX_BODY, MAX_DEPTH

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PORT = 8765
CALL = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class _Renter:
    def __init__(self) -> None:
        self.calls = 0

    async def run(self, *args, **kwargs):
        self.calls += 1
        raise LookupError("the stub served the call")  # a 500: enough to see the call was made


def _client(keyless: bool = False, hosts: tuple[str, ...] = ()) -> tuple[TestClient, _Renter]:
    renter = _Renter()
    service = types.SimpleNamespace(escrow=None, renter=renter, status=lambda: {"ok": True})
    app = build_app(service, TOKEN, openai_keyless=keyless, hosts=hosts)
    return TestClient(app, backend="trio", base_url=f"http://127.0.0.1:{PORT}"), renter


def _face_shape(path: str, body: dict) -> None:
    keys = {"message", "type", "param", "code"} if path.startswith("/v1/") else {"message", "type", "code"}
    assert set(body["error"]) == keys, body


@pytest.mark.parametrize("host", [f"127.0.0.1:{PORT}", "127.0.0.1", f"localhost:{PORT}", "LOCALHOST", "[::1]",
                                  f"[::1]:{PORT}", f"[0:0::1]:{PORT}"])
def test_loopback_hosts_with_or_without_the_bound_port_pass(host):
    client, _ = _client()
    r = client.get("/api/v1/status", headers=AUTH | {"host": host})
    assert r.status_code == 200 and r.json() == {"ok": True}


@pytest.mark.parametrize("host", ["evil.example", f"evil.example:{PORT}", "localhost.evil.example", "127.0.0.1:9",
                                  "localhost:", "10.0.0.5", "", "127.0.0.1 :80", "localhost@evil.example"])
@pytest.mark.parametrize("path", ["/api/v1/status", "/v1/models", "/metrics", "/v1/chat/completions"])
def test_any_other_host_is_misdirected_on_every_face(host, path):
    client, renter = _client(keyless=True)
    method = "POST" if path.endswith("completions") else "GET"
    r = client.request(method, path, headers=AUTH | {"host": host}, json=CALL if method == "POST" else None)
    assert r.status_code == 421, (host, path, r.text)
    assert r.json()["error"]["code"] == "misdirected_request"
    _face_shape(path, r.json())
    assert renter.calls == 0


def test_the_host_the_daemon_was_told_to_bind_passes_too():
    client, _ = _client(hosts=("127.0.0.7",))
    assert client.get("/api/v1/status", headers=AUTH | {"host": f"127.0.0.7:{PORT}"}).status_code == 200
    assert client.get("/api/v1/status", headers=AUTH | {"host": "127.0.0.8"}).status_code == 421


@pytest.mark.parametrize("origin", ["https://evil.example", "http://evil.example:8765", "null",
                                    "http://localhost.evil.example", "file://", "chrome-extension://abc"])
def test_a_foreign_origin_is_refused_before_the_call(origin):
    client, renter = _client(keyless=True)
    for path in ("/v1/chat/completions", "/api/v1/run"):
        r = client.post(path, json=CALL, headers=AUTH | {"origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_refused", (origin, r.text)
        _face_shape(path, r.json())
    assert renter.calls == 0


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:8765", "https://[::1]"])
def test_a_page_served_from_loopback_may_call(origin):
    client, renter = _client(keyless=True)
    r = client.post("/v1/chat/completions", json=CALL, headers={"origin": origin})
    assert r.status_code == 500 and renter.calls == 1  # it reached the (failing) stub


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None, "application/json; charset=latin-1", "application/jsonx",
                                          "text/json"])
def test_a_body_that_is_not_json_is_415_and_costs_nothing(content_type):
    """The CSRF of finding 13: a page POSTs ``text/plain`` to the keyless API, no preflight needed."""
    client, renter = _client(keyless=True)
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/api/v1/run", "/api/v1/escrow/mint"):
        r = client.post(path, content=json.dumps(CALL).encode(), headers=AUTH | headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (path, r.text)
        _face_shape(path, r.json())
    assert renter.calls == 0


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON; charset=\"UTF-8\""])
def test_json_with_or_without_a_utf8_charset_passes(content_type):
    client, renter = _client()
    r = client.post("/v1/chat/completions", content=json.dumps(CALL).encode(),
                    headers=AUTH | {"content-type": content_type})
    assert r.status_code == 500 and renter.calls == 1


def test_a_request_without_a_body_needs_no_content_type():
    client, _ = _client()
    r = client.delete("/api/v1/sessions/ab", headers=AUTH)  # the CLI's DELETE: no body, no content type
    assert r.status_code != 415


def test_a_body_over_the_limit_is_413_before_it_is_read():
    client, renter = _client(keyless=True)
    big = json.dumps(CALL | {"pad": "x" * MAX_BODY}).encode()
    for path in ("/v1/chat/completions", "/api/v1/run"):
        r = client.post(path, content=big, headers=AUTH | {"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        _face_shape(path, r.json())

    def chunks():  # no Content-Length: counted as it is read
        yield b'{"pad": "'
        for _ in range(MAX_BODY // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    r = client.post("/api/v1/run", content=chunks(), headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert renter.calls == 0


def test_json_nested_too_deep_is_the_callers_400():
    client, renter = _client()
    deep = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * MAX_DEPTH \
        + b"]" * MAX_DEPTH + b"}"
    for path in ("/v1/chat/completions", "/api/v1/run"):
        r = client.post(path, content=deep, headers=AUTH | {"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    shallow = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"[" * 100 + b'"}], "x": [[{}]]}'
    r = client.post("/v1/chat/completions", content=shallow, headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 500 and renter.calls == 1  # brackets inside strings do not count
