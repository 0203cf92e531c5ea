"""Cancellation through a real consumer daemon's OpenAI face: a client that closes its SSE stream
mid-answer cancels the call. The provider stops generating, the receipt both sign bills only the
tokens streamed before the cut (far below max_tokens), and the escrow pays exactly that."""

from __future__ import annotations

import json

import httpx

from tests.e2e.daemons import Daemon, poll, start_market

MAX_TOKENS = 1500


def _api(daemon: Daemon, home) -> httpx.Client:
    token = (home / "api.token").read_text().strip()
    return httpx.Client(base_url=daemon.info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_a_client_that_closes_the_stream_pays_only_for_what_was_streamed(tmp_path):
    started: list[Daemon] = []
    try:
        agent, provider, consumer, aid = start_market(tmp_path, started, mint="5")
        shown = ""
        with _api(consumer, tmp_path / "consumer") as http:
            with http.stream("POST", "/v1/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story"}],
                    "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "escrow": aid}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    doc = json.loads(line[6:])
                    assert "error" not in doc, doc
                    if doc.get("choices"):
                        shown += doc["choices"][0]["delta"].get("content") or ""
                    if len(shown) >= 40:
                        break  # the client goes away: the connection closes unread
            assert len(shown) >= 40

            def cancelled_receipt():
                page = http.get("/api/v1/receipts", params={"limit": 5}).json()
                return next(iter(page["receipts"]), None)

            receipt = poll(cancelled_receipt, 60, "the cancelled call's receipt")
        assert receipt["finish_reason"] == "length" and receipt["consumer_sig"]
        # billed: the tokens streamed before the daemon saw the client go, never the whole answer
        assert len(shown) <= receipt["tokens_out"] < MAX_TOKENS // 2, receipt
        with _api(provider, tmp_path / "provider") as http:
            def paid():
                balance = http.get("/api/v1/wallet/balance", params={"escrow": aid}).json()
                return balance if balance["available"] == receipt["cost"] else None

            poll(paid, 60, "the escrow paying the cancelled call")
            theirs = http.get("/api/v1/receipts", params={"limit": 5}).json()["receipts"]
        assert [r["receipt_id"] for r in theirs] == [receipt["receipt_id"]]  # the provider holds the same receipt
    finally:
        for d in started:
            d.stop()
