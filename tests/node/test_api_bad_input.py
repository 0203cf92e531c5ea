"""Hostile findings 13 and 15 against a real consumer node: bad input to its HTTP API — too big for
the wire (a 1 MiB prompt, 2,000 messages, long ``stop`` strings, huge ``max_tokens`` or ``budget``,
deep JSON, a 3 MiB body), or sent the way a hostile web page would (``text/plain``, a foreign
``Origin`` or ``Host``) — is answered 4xx before any money moves: no channel is opened and the
consumer's balance at the escrow agent is exactly what was minted. An honest call afterwards is
served and costs exactly its receipt.

The swarm runs in process (an agent that also provides ``tiny``, and a consumer whose API is
served keyless on 127.0.0.1, port 0, as ``make run`` serves it)."""

from __future__ import annotations

import json

import httpx
import trio

from node import open_swarm
from node.daemon import serve_node_api
from tests.e2e.fast_upstream import fast_upstream

MINTED = 5_000_000
TOKEN = "unused-keyless"
HI = [{"role": "user", "content": "hi"}]
MiB = 1 << 20


def _openai(**extra):
    return "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 4} | extra


def _control(**extra):
    return "/api/v1/run", {"model": "tiny", "messages": HI, "max_tokens": 4} | extra


# (what, path, body, status, the field or code the answer names)
BAD_BODIES = [
    ("1 MiB prompt (each field fits, the call is over one frame)",
     *_openai(messages=[{"role": "user", "content": "x" * MiB}]), 413, "request_too_large"),
    ("1 MiB prompt, control face", *_control(prompt="x" * MiB, messages=None), 413, "request_too_large"),
    ("content over 1 MiB", *_openai(messages=[{"role": "user", "content": "x" * (MiB + 1)}]), 400,
     "messages.0.content"),
    ("2,000 messages", *_openai(messages=HI * 2000), 400, "messages"),
    ("2,000 messages, control face", *_control(messages=HI * 2000), 400, "messages"),
    ("five stop strings", *_openai(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("a 65-byte stop string", *_openai(stop=["x" * 65]), 400, "stop"),
    ("max_tokens over 2^24", *_openai(max_tokens=(1 << 24) + 1), 400, "max_tokens"),
    ("max_tokens over 2^24, control face", *_control(max_tokens=(1 << 24) + 1), 400, "max_tokens"),
    ("a budget over the wire's amount", *_openai(budget=10**15 + 1), 400, "budget"),
    ("a budget over the wire's amount, control face", *_control(budget=10**15 + 1), 400, "budget"),
    ("temperature over 2", *_openai(temperature=2.5), 400, "temperature"),
    ("top_p over 1", *_openai(top_p=1.01), 400, "top_p"),
    ("a role the wire does not carry, control face", *_control(messages=[{"role": "robot", "content": "x"}]), 400,
     "messages.0.role"),
    ("a model name over 128 bytes", *_openai(model="m" * 129), 400, "model"),
    ("a tier that does not exist, control face", *_control(tier="gold"), 400, "tier"),
    ("a max_price over the wire's price", *_openai(provider={"max_price": {"input": 10**13}}), 400,
     "provider.max_price.input"),
    # agent calls: what the wire cannot carry, or nobody here serves, is refused before money moves
    ("129 tools", *_openai(tools=[{"type": "function", "function": {"name": "f"}}] * 129), 400, "tools"),
    ("a tool schema over 64 KiB", *_openai(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"description": "x" * 70_000}}}]), 400, "tools.0.function.parameters"),
    ("tool_choice naming no tool", *_openai(tools=[{"type": "function", "function": {"name": "f"}}],
                                            tool_choice={"type": "function", "function": {"name": "g"}}), 400,
     "tool_choice"),
    ("top_logprobs over 20", *_openai(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("n=2", *_openai(n=2), 400, "n"),
    ("tools on a model no provider lists tools for", *_openai(
        model="vectors", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_feature"),
    ("token-id embeddings input", "/v1/embeddings", {"model": "vectors", "input": [[1, 2, 3]]}, 400, "input"),
    ("embeddings of a chat model", "/v1/embeddings", {"model": "tiny", "input": "x"}, 400, "unsupported_feature"),
    ("chat on an embeddings model", *_openai(model="vectors"), 400, "unsupported_feature"),
    ("an echoed legacy completion", "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
    ("a legacy completion of token ids", "/v1/completions", {"model": "tiny", "prompt": [1, 2]}, 400, "prompt"),
]


def _named(doc: dict, expected: str) -> bool:
    err = doc["error"]
    return expected in (err.get("param"), err.get("code")) or err["message"].startswith(expected)


async def test_bad_input_is_a_4xx_and_no_money_moves(tmp_path):
    async with open_swarm(tmp_path / "agent", passphrase="pw", escrow=True) as agent:
        await agent.offer("tiny", input_price=100_000, output_price=200_000)
        with fast_upstream() as upstream:
            await agent.offer("vectors", backend=f"openai:{upstream}", input_price=10_000, output_price=0,
                              features=("embeddings",))
        async with open_swarm(tmp_path / "consumer", passphrase="pw", bootstrap=agent.addrs) as consumer, \
                trio.open_nursery() as nursery:
            await agent.mint(consumer.peer_id, MINTED)
            await consumer.wait_for("tiny")
            await consumer.wait_for("vectors")
            await nursery.start(lambda task_status: serve_node_api(consumer.service, "127.0.0.1:0", TOKEN,
                                                                   openai_keyless=True, task_status=task_status))
            url = consumer.service.api_url

            async def untouched(what: str) -> None:
                balance = await consumer.balance(agent.peer_id)
                assert (balance["available"], balance["locked"], balance["channels"]) == (MINTED, 0, []), \
                    (what, balance)

            auth = {"authorization": f"Bearer {TOKEN}"}  # the control face's; the keyless face ignores it
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as http:
                for what, path, body, status, named in BAD_BODIES:
                    r = await http.post(path, json={k: v for k, v in body.items() if v is not None})
                    assert r.status_code == status and _named(r.json(), named), (what, r.status_code, r.text[:300])
                await untouched("bad bodies")

                raw = json.dumps(_openai()[1]).encode()
                deep = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "x": ' \
                    + b"[" * 40 + b"]" * 40 + b"}"
                attacks = [  # (what, path, content, headers, status, code)
                    ("a text/plain POST (CSRF from any web page)", "/v1/chat/completions", raw,
                     {"content-type": "text/plain"}, 415, "unsupported_media_type"),
                    ("a form POST", "/v1/chat/completions", b"model=tiny", {"content-type":
                                                                           "application/x-www-form-urlencoded"},
                     415, "unsupported_media_type"),
                    ("JSON from a foreign page", "/v1/chat/completions", raw,
                     {"content-type": "application/json", "origin": "https://evil.example"}, 403,
                     "cross_origin_refused"),
                    ("a DNS-rebound Host", "/v1/chat/completions", raw,
                     {"content-type": "application/json", "host": "evil.example:80"}, 421, "misdirected_request"),
                    ("a rebound Host on the control face", "/api/v1/run", raw,
                     {"content-type": "application/json", "host": "evil.example", "authorization":
                      f"Bearer {TOKEN}"}, 421, "misdirected_request"),
                    ("JSON 40 deep", "/v1/chat/completions", deep, {"content-type": "application/json"}, 400,
                     "invalid_json"),
                    ("a 3 MiB body", "/v1/chat/completions", b'{"pad": "' + b"x" * (3 * MiB) + b'"}',
                     {"content-type": "application/json"}, 413, "request_too_large"),
                ]
                for what, path, content, headers, status, code in attacks:
                    r = await http.post(path, content=content, headers=headers)
                    assert r.status_code == status and r.json()["error"]["code"] == code, (what, r.text[:300])
                metrics = await http.get("/metrics", headers={"host": "evil.example"})
                assert metrics.status_code == 421
                await untouched("hostile requests")

                # the same node serves an honest call, and it costs exactly its receipt
                r = await http.post("/v1/chat/completions", json=_openai()[1] | {"escrow": agent.peer_id})
                assert r.status_code == 200, r.text
                cost = r.json()["cost"]
                assert cost > 0
                with trio.fail_after(30):  # the channel settles (its remainder refunded) once the session ends
                    while (balance := await consumer.balance(agent.peer_id))["locked"]:
                        await trio.sleep(0.05)
                assert balance["available"] == MINTED - cost
            nursery.cancel_scope.cancel()
