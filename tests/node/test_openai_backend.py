"""The openai: backend against a real OpenAI-compatible server (`transformers serve` on the
builtin model's folder, loopback); its API key never leaves the provider's backend — not even
when a hostile upstream echoes it back in an error (hostile finding 14)."""

from __future__ import annotations

import http.server
import json
import logging
import threading

import pytest

import protocol
from node.consumer._session_client import CallRefused
from node.provider._offers import Offer
from node.provider.backends._base import BackendError
from node.provider.backends._openai import OpenAIBackend, summarise_upstream_error
from tests.node.session_rig import session_rig
from tests.node.upstream import transformers_serve

SECRET = "sk-test-1f8e1d2c3b4a59687766554433221100"


@pytest.fixture
def upstream():
    with transformers_serve() as server:
        yield server


async def test_openai_backend_meters_from_upstream_and_keeps_its_key(upstream, caplog):
    base_url, model = upstream
    caplog.set_level(logging.DEBUG)
    spec = f"openai:{base_url}#upstream"
    backend = OpenAIBackend.from_spec(spec, lambda name: {"upstream": SECRET}[name], model=model)
    assert SECRET not in repr(backend)
    the_offer = Offer(model=model, backend=spec, input_price=1_000_000, output_price=2_000_000, max_context=4096)
    listing_bytes = protocol.encode(protocol.sign(protocol.Listing(
        provider=protocol.peer_id_from_public_key(b"\x01" * 32), addrs=(), seq=1, issued_at=1, expires_at=2,
        provider_type="cloud", models=(the_offer.to_model_offer(),), escrow_agents=(), hardware=protocol.Hardware()),
        "sig", _Signer()))
    assert SECRET.encode() not in listing_bytes
    async with session_rig({model: the_offer}, {model: backend}, tag="openai") as rig:
        channel = await rig.open_channel(cap=1_000_000)
        seen: list[bytes] = []
        async with rig.session(channel, model=model) as session:
            receive = session._framed.receive

            async def recording_receive(*args, **kwargs):
                msg = await receive(*args, **kwargs)
                seen.append(protocol.encode(msg))
                return msg

            session._framed.receive = recording_receive
            result = await session.call([{"role": "user", "content": "Hello upstream"}], 12)
        r = result.receipt
        assert 0 < r.tokens_out <= 12 and r.output_hash == protocol.output_hash(result.text)
        assert r.cost == protocol.call_cost(the_offer.to_model_offer().price, r.tokens_in, r.tokens_out)
        assert seen and all(SECRET.encode() not in m for m in seen)
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    await backend.aclose()


class _Signer:
    public_key = b"\x01" * 32

    def sign_bytes(self, data: bytes) -> bytes:
        return b"\x00" * 64


# ---- hostile finding 14: an upstream that echoes the request's headers ----------------------------


class _EchoingUpstream(http.server.BaseHTTPRequestHandler):
    """Answers every call with what it was sent, the Authorization header included: as a JSON error
    (401), as a text page (500), or as an error event inside a 200 stream (``self.server.mode``)."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        echo = f"bad key: {self.headers.get('authorization')}; headers: {dict(self.headers)}"
        mode = self.server.mode
        if mode == "json":
            status, ctype, body = 401, "application/json", json.dumps({"error": {"message": echo}}).encode()
        elif mode == "text":
            status, ctype, body = 500, "text/html", f"<pre>{echo}\n{'x' * 100_000}</pre>".encode()
        else:
            status, ctype = 200, "text/event-stream"
            body = b"data: " + json.dumps({"error": {"message": echo}}).encode() + b"\n\ndata: [DONE]\n\n"
        self.send_response(status, f"Nope {self.headers.get('authorization')}")  # even the reason phrase
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echoing():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoingUpstream)
    server.mode = "json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _leaks(text: str) -> bool:
    return SECRET in text or SECRET[3:20] in text or "Bearer sk-" in text


@pytest.mark.parametrize("mode", ["json", "text", "stream"])
async def test_an_upstream_that_echoes_the_key_never_gets_it_passed_on(echoing, mode, caplog):
    echoing.mode = mode
    caplog.set_level(logging.DEBUG)
    spec = f"openai:http://127.0.0.1:{echoing.server_address[1]}/v1#upstream"
    backend = OpenAIBackend.from_spec(spec, lambda name: {"upstream": SECRET}[name], model="m")
    await backend.start()
    try:
        async def on_piece(text, tokens):
            pass

        with pytest.raises(BackendError) as failed:
            await backend.generate([{"role": "user", "content": "hi"}], max_tokens=4, temperature_milli=1000,
                                   top_p_milli=1000, stop=(), on_piece=on_piece)
    finally:
        await backend.aclose()
    message = str(failed.value)
    assert not _leaks(message) and len(message) < 300, message
    assert message.startswith("upstream answered " + {"json": "401 Unauthorized", "text": "500 Internal Server Error",
                                                      "stream": "200"}[mode])
    assert "x" * 200 not in message  # the body is not passed on, only its message
    assert all(not _leaks(record.getMessage()) for record in caplog.records)


async def test_the_consumer_hears_a_summary_not_the_upstream_body(echoing, caplog):
    """The same upstream behind a real provider: the consumer's CallRefused detail, and every log
    line on both sides, hold no trace of the key."""
    caplog.set_level(logging.DEBUG)
    spec = f"openai:http://127.0.0.1:{echoing.server_address[1]}/v1#upstream"
    backend = OpenAIBackend.from_spec(spec, lambda name: {"upstream": SECRET}[name], model="m")
    the_offer = Offer(model="m", backend=spec, input_price=1_000, output_price=1_000, max_context=4096)
    async with session_rig({"m": the_offer}, {"m": backend}, tag="echo") as rig:
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel, model="m") as session:
            with pytest.raises(CallRefused) as refused:
                await session.call([{"role": "user", "content": "Hello upstream"}], 4)
    await backend.aclose()
    assert refused.value.reason == "backend_error" and refused.value.detail.startswith("upstream answered 401")
    assert not _leaks(str(refused.value)), refused.value
    assert all(not _leaks(record.getMessage()) for record in caplog.records)


def test_redaction_keeps_a_useful_reason():
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {SECRET}. Authorization: Bearer abc123def456"
                                            " token=0123456789abcdef"}}).encode()
    summary = summarise_upstream_error(401, "whatever", body, (SECRET,))
    assert summary == ("upstream answered 401 Unauthorized: Incorrect API key provided: [redacted]. "
                       "Authorization: [redacted] [redacted]")
    ok = json.dumps({"error": {"message": "This model's maximum context length is 4096 tokens"}}).encode()
    assert summarise_upstream_error(400, "", ok) == ("upstream answered 400 Bad Request: This model's maximum "
                                                     "context length is 4096 tokens")
    assert summarise_upstream_error(502, "", b"<html>" + SECRET.encode()) == "upstream answered 502 Bad Gateway"
    multi = json.dumps({"error": "line one\nforged log line"}).encode()
    assert "\n" not in summarise_upstream_error(500, "", multi)
