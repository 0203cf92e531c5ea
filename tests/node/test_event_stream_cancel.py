"""The daemon's streamed responses (``_http.EventStream``) cancel what they run when the client
goes away, and a face's running calls can be cancelled by id, the stream then ending with what
the cancelled call cost (the line the CLI prints after Ctrl-C)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from node._errors import NotFound
from node.api._http import NDJSONStream, RunningCalls, SSEStream
from node.consumer._results import CancelledCall, report_cancelled


class Client:
    """The ASGI side of one HTTP exchange: the body went already; ``leave`` is the client going away."""

    def __init__(self) -> None:
        self.gone = trio.Event()
        self.body = b""
        self.lines: list[Any] = []
        self.line_came = trio.Event()
        self.ended = False

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        self.body += message.get("body", b"")
        texts = [line.removeprefix(b"data: ") for line in self.body.splitlines()]  # NDJSON or SSE
        self.lines = [json.loads(t) for t in texts if t.strip() and t != b"[DONE]"]
        self.line_came.set()
        self.line_came = trio.Event()
        self.ended = not message.get("more_body", False)

    async def wait_lines(self, n: int) -> None:
        with trio.fail_after(5):
            while len(self.lines) < n:
                await self.line_came.wait()


def _producer(stopped: list[str], cost: CancelledCall | None = None):
    async def produce(emit: Any) -> None:
        await emit({"delta": "Hel"})
        try:
            await trio.sleep_forever()  # a call that would run on with nobody reading
        except trio.Cancelled:
            stopped.append("cancelled")
            if cost is not None:
                report_cancelled(cost)  # what the session client does once it settled the prefix
            raise

    return produce


async def test_a_client_that_goes_away_cancels_the_stream_s_work():
    stopped: list[str] = []
    client = Client()
    stream = SSEStream(_producer(stopped), lambda p: {"error": p.message})
    with trio.fail_after(10):  # without the cancel, the stream would run on forever
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream, {"type": "http"}, client.receive, client.send)
            while b"Hel" not in client.body:
                await trio.sleep(0)
            client.gone.set()
    assert stopped == ["cancelled"]


async def test_a_cancelled_call_s_stream_ends_with_what_it_cost():
    calls, stopped, client = RunningCalls(), [], Client()
    cost = CancelledCall("provider", "m", "Hel", None, "settled")
    stream = NDJSONStream(_producer(stopped, cost), lambda p: {"error": p.message}, calls=calls,
                          started_event=lambda call_id: {"call": {"id": call_id}},
                          cancelled_event=lambda c: {"cancelled": c.to_json() if c else None})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream, {"type": "http"}, client.receive, client.send)
        await client.wait_lines(2)
        first, delta = client.lines
        assert delta == {"delta": "Hel"} and len(calls) == 1
        calls.cancel(first["call"]["id"])  # POST /api/v1/calls/{id}/cancel
        await client.wait_lines(3)
    assert stopped == ["cancelled"] and client.ended
    assert client.lines[-1] == {"cancelled": cost.to_json()}
    assert client.lines[-1]["cancelled"]["text"] == "Hel"
    assert len(calls) == 0
    with pytest.raises(NotFound):  # over: nothing to cancel
        calls.cancel(first["call"]["id"])


async def test_an_unknown_call_cannot_be_cancelled():
    with pytest.raises(NotFound):
        RunningCalls().cancel("0" * 24)
