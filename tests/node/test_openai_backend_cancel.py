"""The openai backend, cancelled mid-stream (the consumer cancelled its call), closes the upstream
stream at once, so the upstream server stops generating; each streamed piece claims one token."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
import trio

from node.provider.backends._openai import OpenAIBackend

EVENTS = 500  # what the upstream would stream, 20 ms apart, if nobody hung up


class _SlowUpstream(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        server = self.server
        try:
            for i in range(EVENTS):
                event = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.flush()
                server.sent += 1
                server.tick.wait(0.02)  # paced like a model's tokens
            usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": EVENTS}}
            self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            server.hung_up.set()


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowUpstream)
    server.sent, server.hung_up, server.tick = 0, threading.Event(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_a_cancelled_generation_hangs_up_on_the_upstream(upstream):
    backend = OpenAIBackend(f"openai:http://127.0.0.1:{upstream.server_address[1]}/v1",
                            f"http://127.0.0.1:{upstream.server_address[1]}/v1", "m", None)
    await backend.start()
    pieces: list[tuple[str, int]] = []
    try:
        with trio.CancelScope() as scope:
            async def on_piece(text: str, tokens: int) -> None:
                pieces.append((text, tokens))
                if len(pieces) == 3:
                    scope.cancel()  # the consumer's Cancel reached the provider

            await backend.generate([{"role": "user", "content": "hi"}], max_tokens=EVENTS, temperature_milli=0,
                                   top_p_milli=1000, stop=(), on_piece=on_piece)
        assert scope.cancelled_caught
        with trio.fail_after(10):  # the upstream notices at its next write or two (the client is still open)
            while not upstream.hung_up.is_set():
                await trio.sleep(0.01)
    finally:
        await backend.aclose()
    assert pieces == [("w0 ", 1), ("w1 ", 1), ("w2 ", 1)]  # a token claimed per piece, as it came
    assert upstream.sent < EVENTS // 2
