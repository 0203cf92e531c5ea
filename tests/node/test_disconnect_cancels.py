"""A client that gives up on a non-streamed call (an agent's timeout, Ctrl-C of a plain request)
cancels the call: hypercorn only tells the app ``http.disconnect`` and ran the handler to its end,
so a call nobody would read was paid in full. Both faces, driven as ASGI apps, with a renter whose
call runs until it is cancelled; a client that stays gets its answer as before."""

from __future__ import annotations

import json
import types
from typing import Any

import pytest
import trio

from node.api import build_app

TOKEN = "t" * 32
ROUTES = [("/api/v1/run", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
          ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})]


def _service(started: trio.Event, stopped: list[str]) -> Any:
    async def run(*args: Any, **kwargs: Any) -> Any:
        started.set()
        try:
            await trio.sleep_forever()  # a long call: it ends only by cancellation here
        except trio.Cancelled:
            stopped.append("cancelled")
            raise

    return types.SimpleNamespace(escrow=None, renter=types.SimpleNamespace(run=run))


async def _exchange(app: Any, path: str, body: dict, leave: trio.Event) -> list[dict]:
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode()), (b"authorization", f"Bearer {TOKEN}".encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    sent: list[dict] = []
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path,body", ROUTES, ids=["control", "openai"])
async def test_a_client_that_goes_away_cancels_its_plain_call(path, body):
    started, stopped, leave = trio.Event(), [], trio.Event()
    app = build_app(_service(started, stopped), TOKEN, hosts=("127.0.0.1",))
    with trio.move_on_after(10) as timer:  # without the watcher the exchange would never end
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_exchange, app, path, body, leave)
            await started.wait()
            leave.set()  # the client closes the connection while the call runs
    assert not timer.cancelled_caught, "the call ran on after its client had gone"
    assert stopped == ["cancelled"]


async def test_a_client_that_stays_gets_its_answer():
    async def run(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug")  # answered at once: the watcher must not be what ends it

    app = build_app(types.SimpleNamespace(escrow=None, renter=types.SimpleNamespace(run=run)), TOKEN,
                    hosts=("127.0.0.1",))
    with trio.fail_after(10):
        sent = await _exchange(app, *ROUTES[0], trio.Event())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 500 and b"internal_error" in b"".join(m.get("body", b"") for m in sent)
