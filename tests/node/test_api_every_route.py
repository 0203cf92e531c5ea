"""Every route of the daemon's HTTP API, control and OpenAI faces, answers malformed input — a bad
peer id, a number that is not one or is out of range, a wrong type, a path segment that names
nothing — with a 4xx JSON error, never a 500 (a 500 is a bug, its traceback in the log).

The routes are read from the app itself, so a route added later is covered without editing this
test; the field names come from every declared request body. Each request carries one bad field
at a time (the others missing), so none can be a valid money operation: the consumer's balance at
the agent stays exactly what was minted."""

from __future__ import annotations

import httpx
import trio

from node import open_swarm
from node.api import _control, _http, _openai
from node.api._control import build_app

MINTED = 3_000_000
TOKEN = "t" * 32
PEER_LIKE = "12D3KooWGarbageGarbageGarbageGarbageGarbageGarbage"
BAD_VALUES = ["garbage", PEER_LIKE, -1, 10**40, [], None]
BAD_QUERY = ["garbage", PEER_LIKE, "-1", "1e99", "", "99999999999999999999999"]
QUERY_NAMES = ["escrow", "agent", "model", "sort", "period", "by", "limit", "offset", "provider", "channel",
               "channel_id", "peer", "since", "export", "format", "hours"]
BAD_SEGMENTS = ["garbage", "0" * 32, "zz" * 16, "%00", "12D3KooW", "x" * 300]


def _field_names() -> list[str]:
    names: set[str] = set()
    seen: list[type] = [_http.Body]
    while seen:
        cls = seen.pop()
        names.update(getattr(cls, "model_fields", {}))
        seen.extend(cls.__subclasses__())
    assert {"model", "escrow", "amount", "max_tokens"} <= names, names  # the walk found the bodies
    return sorted(names)


def _fill(path: str, segment: str) -> str:
    out = []
    for part in path.split("/"):
        out.append(segment if part.startswith("{") else part)
    return "/".join(out)


def _acceptable(r: httpx.Response) -> str | None:
    """Why ``r`` is not a proper answer, or None."""
    if r.status_code >= 500:
        return f"{r.status_code}: {r.text[:300]}"
    if r.status_code >= 400:
        try:
            doc = r.json()
        except ValueError:
            return f"{r.status_code} with a body that is not JSON: {r.text[:200]!r}"
        if not (isinstance(doc, dict) and isinstance(doc.get("error"), dict) and doc["error"].get("message")):
            return f"{r.status_code} without an error message: {r.text[:200]}"
    return None


async def test_every_route_answers_bad_input_with_a_4xx_json_error(tmp_path):
    assert _control and _openai  # both faces' bodies are declared in these modules
    fields = _field_names()
    async with open_swarm(tmp_path / "agent", passphrase="pw", escrow=True) as agent:
        await agent.offer("tiny", input_price=100_000, output_price=200_000)
        async with open_swarm(tmp_path / "consumer", passphrase="pw", bootstrap=agent.addrs) as consumer:
            await agent.mint(consumer.peer_id, MINTED)
            app = build_app(consumer.service, TOKEN, hosts=("127.0.0.1",))
            routes = [(m, r.path) for r in app.routes for m in sorted(getattr(r, "methods", None) or ()) if m != "HEAD"]
            assert len(routes) >= 20, routes
            failures: list[str] = []
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                         headers={"authorization": f"Bearer {TOKEN}"}, timeout=30) as http:

                async def check(method: str, url: str, **kwargs) -> None:
                    with trio.fail_after(30):
                        r = await http.request(method, url, **kwargs)
                    why = _acceptable(r)
                    if why:
                        failures.append(f"{method} {url} {kwargs.get('json', kwargs.get('params', ''))!r}: {why}")

                for method, path in routes:
                    segments = BAD_SEGMENTS if "{" in path else [None]
                    for segment in segments:
                        url = _fill(path, segment) if segment is not None else path
                        if method == "GET" or method == "DELETE":
                            await check(method, url)
                            for name in QUERY_NAMES:
                                for value in BAD_QUERY:
                                    await check(method, url, params={name: value})
                        else:
                            await check(method, url, json={})
                            await check(method, url, content=b"[1, 2", headers={"content-type": "application/json"})
                            for name in fields:
                                for value in BAD_VALUES:
                                    await check(method, url, json={name: value})
            assert not failures, f"{len(failures)} bad answers, e.g.:\n" + "\n".join(failures[:25])
            balance = await consumer.balance(agent.peer_id)
            assert (balance["available"], balance["locked"]) == (MINTED, 0), balance
