"""An OpenAI-compatible upstream that answers at once (a thread in the test's process), so end-to-end
tests and benches measure the swarm, not a model: every chat completion is ``WORDS`` words with usage."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from contextlib import contextmanager
from typing import Any, Iterator

WORDS = 8
PROMPT_TOKENS = 12


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, content_type: str, data: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        words = [f"w{i} " for i in range(WORDS)]
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": WORDS, "total_tokens": PROMPT_TOKENS + WORDS}
        if not body.get("stream"):
            doc = {"id": "x", "object": "chat.completion", "model": body.get("model", ""), "usage": usage,
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "".join(words)}}]}
            self._send("application/json", json.dumps(doc).encode())
            return
        events = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
        events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, {"choices": [], "usage": usage}]
        self._send("text/event-stream",
                   b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n")


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 4096


@contextmanager
def fast_upstream() -> Iterator[str]:
    """Serve on 127.0.0.1 (a free port) for the block; yields the base URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
