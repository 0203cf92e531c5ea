"""The OpenAI-compatible API of a consumer daemon, with plain HTTP and with the official client."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.daemons import Daemon, start_market


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-api")
    started: list[Daemon] = []
    try:
        agent, provider, consumer, aid = start_market(tmp, started, mint="3")
        token = (tmp / "consumer" / "api.token").read_text().strip()
        yield consumer, provider, aid, token
    finally:
        for d in started:
            d.stop()


def _client(consumer, token):
    return httpx.Client(base_url=consumer.info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_models_and_a_chat_completion(market):
    consumer, provider, aid, token = market
    with _client(consumer, token) as http:
        models = http.get("/v1/models").json()
        assert models["object"] == "list"
        (tiny,) = [m for m in models["data"] if m["id"] == "tiny"]
        assert tiny["pricing"] == {"input": 500_000, "output": 1_500_000, "unit": "micro-credits per 1K tokens"}
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 12, "escrow": aid})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["role"] == "assistant"
        assert doc["provider"] == provider.info["peer_id"] and doc["cost"] > 0 and len(doc["receipt_id"]) == 64
        assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]


def test_streaming_ends_with_usage(market):
    consumer, provider, aid, token = market
    events = []
    with _client(consumer, token) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "Stream please"}], "max_tokens": 10,
                "stream": True, "stream_options": {"include_usage": True}, "escrow": aid,
                "provider": {"sort": "cheapest", "allow_fallbacks": False}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-2]["receipt_id"] == chunks[-1]["receipt_id"]  # the finish chunk names the receipt too
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 10 and usage["cost"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert len(text) > 0 or usage["usage"]["completion_tokens"] == 0


def test_openai_shaped_errors(market):
    consumer, _, aid, token = market
    with _client(consumer, token) as http:
        unknown = http.post("/v1/chat/completions", json={"model": "no-such-model",
                                                          "messages": [{"role": "user", "content": "x"}]})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        bad = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        budget = http.post("/v1/chat/completions", json={"model": "tiny", "escrow": aid, "budget": 1,
                                                         "messages": [{"role": "user", "content": "x"}]})
        assert budget.status_code == 402 and budget.json()["error"]["type"] == "insufficient_quota", budget.text
        broke = http.post("/v1/chat/completions", json={"model": "tiny", "escrow": aid, "budget": 10**12,
                                                        "messages": [{"role": "user", "content": "x"}]})
        assert broke.status_code == 402 and broke.json()["error"]["code"] == "insufficient_funds"
    anonymous = httpx.get(consumer.info["api_url"] + "/v1/models")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}


def test_the_official_openai_client_works_unchanged(market):
    openai = pytest.importorskip("openai")
    consumer, _, aid, token = market
    client = openai.OpenAI(base_url=consumer.info["api_url"] + "/v1", api_key=token)
    completion = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8, extra_body={"escrow": aid})
    assert completion.choices[0].message.role == "assistant" and completion.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=8, stream=True, stream_options={"include_usage": True},
                                            extra_body={"escrow": aid})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_a_hostile_web_page_cannot_reach_the_daemon(market):
    """Finding 13 against a real daemon: what a page in the user's browser could send — a
    ``text/plain`` POST (no preflight), JSON from a foreign Origin, a DNS-rebound Host — is refused
    before the call, and the consumer's funds stay where they were."""
    consumer, _, aid, token = market
    with _client(consumer, token) as http:
        before = http.get("/api/v1/wallet/balance", params={"escrow": aid}).json()
        body = json.dumps({"model": "tiny", "escrow": aid, "messages": [{"role": "user", "content": "x"}]})
        plain = http.post("/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
        assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
        foreign = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json",
                                                                           "origin": "https://evil.example"})
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "cross_origin_refused"
        for path in ("/v1/models", "/api/v1/status", "/metrics"):
            rebound = http.get(path, headers={"host": "evil.example"})
            assert rebound.status_code == 421 and rebound.json()["error"]["code"] == "misdirected_request", path
        port = consumer.info["api_url"].rsplit(":", 1)[1]
        assert http.get("/api/v1/status", headers={"host": f"localhost:{port}"}).status_code == 200
        after = http.get("/api/v1/wallet/balance", params={"escrow": aid}).json()
        assert (after["available"], after["locked"]) == (before["available"], before["locked"])
