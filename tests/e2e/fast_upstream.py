"""An OpenAI-compatible upstream that answers at once (a thread in the test's process), so end-to-end
tests and benches measure the swarm, not a model.

What it answers (the path's last part decides: ``…/chat/completions``, ``…/completions``,
``…/embeddings``; streamed when the request says ``stream``, else one JSON answer):
- chat: ``WORDS`` words (``w0 w1 …``), one per event, at most ``max_tokens`` of them;
- chat with ``tools`` (and ``tool_choice`` not ``none``), unless the last message is a ``tool``
  result: a call of the named function (``tool_choice`` naming one), else of every tool offered
  (parallel; only the first when ``parallel_tool_calls`` is false), with arguments that satisfy the
  tool's parameter schema, streamed OpenAI's way: the first delta of an index names id and
  function, the arguments follow in pieces of ``ARG_PIECE`` characters over several events;
  ``finish_reason`` ``tool_calls``. After a ``tool`` result: ``the tool said …`` as text;
- ``response_format`` ``json_schema``: JSON valid against the schema (``json_object``: an object),
  in pieces of ``ARG_PIECE`` characters;
- ``logprobs``: each streamed piece carries one entry (``top_logprobs`` alternatives, logprob
  ``-0.25`` for the token, lower for each alternative); legacy completions too (``logprobs: N``);
- embeddings: one deterministic vector per input (bag of words hashed into ``EMBED_DIMS`` or the
  ``dimensions`` asked, normalised; shared words make texts closer), floats or base64;
Usage: ``PROMPT_TOKENS`` prompt tokens and one completion token per streamed piece (embeddings:
words + 1 per input). ``fast_upstream(stream=False)`` answers whole JSON even when asked to stream;
``seen`` collects each request's ``(path, body)``.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import math
import socketserver
import struct
import threading
from contextlib import contextmanager
from typing import Any, Iterator

WORDS = 8
PROMPT_TOKENS = 12
ARG_PIECE = 5
EMBED_DIMS = 16
TOP_TOKENS = [f"t{i}" for i in range(20)]


def schema_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A value valid against a (simple) JSON schema: objects carry every property, arrays their
    ``minItems`` (at least one), strings and numbers respect their minimums; ``$ref`` into
    ``$defs``/``definitions``, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf`` are followed."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 16:
        return None
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return schema_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [s for s in schema[key] if not (isinstance(s, dict) and s.get("type") == "null")]
            return schema_instance((options or schema[key])[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        return {k: schema_instance(v, root, depth + 1) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [schema_instance(schema.get("items") or {"type": "string"}, root, depth + 1)
                for _ in range(max(1, schema.get("minItems", 1)))]
    if kind == "string":
        return "w0".ljust(schema.get("minLength", 0), "x")
    if kind == "integer":
        return max(1, schema.get("minimum", 1))
    if kind == "number":
        return max(1.5, schema.get("minimum", 1.5))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "w0"


def embedding(text: str, dims: int) -> list[float]:
    """The vector of ``text``: its words hashed into ``dims`` buckets, normalised."""
    vec = [0.0] * dims
    for word in text.lower().split() or [""]:
        vec[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dims] += 1.0
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec]


def _pieces(text: str, size: int = ARG_PIECE) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _chat_logprob(token: str, top: int) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": -0.25, "bytes": list(token.encode()),
                         "top_logprobs": [{"token": t, "logprob": -1.0 - i, "bytes": list(t.encode())}
                                          for i, t in enumerate(TOP_TOKENS[:top])]}]}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, content_type: str, data: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _events(self, events: list[dict[str, Any]]) -> None:
        self._send("text/event-stream",
                   b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n")

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        path = self.path.rstrip("/")
        if self.server.seen is not None:
            self.server.seen.append((path, body))
        if path.endswith("/embeddings"):
            self._embeddings(body)
        elif path.endswith("/chat/completions"):
            self._chat(body)
        elif path.endswith("/completions"):
            self._completion(body)
        else:
            self.send_error(404)

    def _streams(self, body: dict[str, Any]) -> bool:
        return bool(body.get("stream")) and self.server.stream

    # ---- chat ------------------------------------------------------------------------------

    def _calls(self, body: dict[str, Any]) -> list[tuple[str, str, str]]:
        """``(id, name, arguments)`` of the tool calls this request gets (none: a text answer)."""
        tools = [t.get("function") or {} for t in body.get("tools") or []]
        choice = body.get("tool_choice")
        messages = body.get("messages") or []
        if not tools or choice == "none" or (messages and messages[-1].get("role") == "tool"):
            return []
        if isinstance(choice, dict):
            tools = [t for t in tools if t.get("name") == (choice.get("function") or {}).get("name")]
        elif body.get("parallel_tool_calls") is False:
            tools = tools[:1]
        return [(f"call_{i}", t["name"], json.dumps(schema_instance(t.get("parameters") or {"type": "object"})))
                for i, t in enumerate(tools)]

    def _text(self, body: dict[str, Any]) -> list[str]:
        """The text answer, in streamed pieces."""
        fmt = body.get("response_format") or {}
        messages = body.get("messages") or []
        if fmt.get("type") == "json_schema":
            return _pieces(json.dumps(schema_instance((fmt.get("json_schema") or {}).get("schema") or {})))
        if fmt.get("type") == "json_object":
            return _pieces(json.dumps({"answer": "w0"}))
        if messages and messages[-1].get("role") == "tool":
            return [f"the tool said {messages[-1].get('content', '')}"]
        return [f"w{i} " for i in range(WORDS)]

    def _chat(self, body: dict[str, Any]) -> None:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 1 << 30
        calls = self._calls(body)
        top = body.get("top_logprobs") or 0
        deltas: list[dict[str, Any]] = []  # one per streamed event
        if calls:
            for index, (call_id, name, args) in enumerate(calls):
                deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                               "function": {"name": name, "arguments": ""}}]})
                deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                           for piece in _pieces(args)]
            finish = "tool_calls"
        else:
            deltas = [{"content": piece} for piece in self._text(body)]
            finish = "stop"
        if len(deltas) > max_tokens and not calls:
            deltas, finish = deltas[:max_tokens], "length"
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(deltas),
                 "total_tokens": PROMPT_TOKENS + len(deltas)}
        if not self._streams(body):
            text = "".join(d.get("content", "") for d in deltas)
            message: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
            if calls:
                message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                         for i, n, a in calls]
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "message": message}
            if body.get("logprobs") and not calls:
                choice["logprobs"] = {"content": [_chat_logprob(d["content"], top)["content"][0] for d in deltas]}
            doc = {"id": "x", "object": "chat.completion", "model": body.get("model", ""), "usage": usage,
                   "choices": [choice]}
            self._send("application/json", json.dumps(doc).encode())
            return
        events = []
        for delta in deltas:
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            if body.get("logprobs") and "content" in delta:
                choice["logprobs"] = _chat_logprob(delta["content"], top)
            events.append({"object": "chat.completion.chunk", "choices": [choice]})
        events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}, {"choices": [], "usage": usage}]
        self._events(events)

    # ---- legacy completions and embeddings ---------------------------------------------------

    def _completion(self, body: dict[str, Any]) -> None:
        words = [f"w{i} " for i in range(min(WORDS, body.get("max_tokens") or WORDS))]
        top = body.get("logprobs")
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(words),
                 "total_tokens": PROMPT_TOKENS + len(words)}

        def logprobs(tokens: list[str]) -> dict[str, Any] | None:
            if top is None:
                return None
            return {"tokens": tokens, "token_logprobs": [-0.25] * len(tokens), "text_offset": [0] * len(tokens),
                    "top_logprobs": [{t: -1.0 - i for i, t in enumerate(TOP_TOKENS[:top])} for _ in tokens]}

        finish = "length" if len(words) < WORDS else "stop"
        if not self._streams(body):
            doc = {"id": "x", "object": "text_completion", "usage": usage, "choices": [
                {"index": 0, "text": "".join(words), "finish_reason": finish, "logprobs": logprobs(words)}]}
            self._send("application/json", json.dumps(doc).encode())
            return
        events = [{"choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": logprobs([w])}]}
                  for w in words]
        events += [{"choices": [{"index": 0, "text": "", "finish_reason": finish}]}, {"choices": [], "usage": usage}]
        self._events(events)

    def _embeddings(self, body: dict[str, Any]) -> None:
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        dims = body.get("dimensions") or EMBED_DIMS
        rows = []
        for i, text in enumerate(inputs):
            vec = embedding(text, dims)
            value: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() \
                if body.get("encoding_format") == "base64" else vec
            rows.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(t.split()) + 1 for t in inputs)
        doc = {"object": "list", "model": body.get("model", ""), "data": rows,
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        self._send("application/json", json.dumps(doc).encode())


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 4096
    stream = True
    seen: list[tuple[str, dict[str, Any]]] | None = None


@contextmanager
def fast_upstream(*, stream: bool = True, seen: list[tuple[str, dict[str, Any]]] | None = None) -> Iterator[str]:
    """Serve on 127.0.0.1 (a free port) for the block; yields the base URL.

    Args:
        stream: False: answer whole JSON even when a request asks to stream.
        seen: when given, each request's ``(path, body)`` is appended to it.
    """
    server = _Server(("127.0.0.1", 0), _Handler)
    server.stream, server.seen = stream, seen
    with serving(server) as url:
        yield url


@contextmanager
def serving(server: http.server.HTTPServer) -> Iterator[str]:
    """Serve ``server`` from a thread for the block (its base URL), then stop it and its thread."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
