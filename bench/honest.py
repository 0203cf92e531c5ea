"""The cost of spot checks and their detection rate against model substitution.

100 greedy calls (16 tokens each) are served by the builtin model A (honest) and by model B
claiming A's commitment (an impostor: another seed). Every call is re-run on A in both
comparisons, so the figures below are per check; at the default rate (``SpotCheckConfig``,
100 permille) a consumer re-runs one call in ten. Printed, all measured in this run:

- served tokens per 100 calls (prompt + completion: the baseline) and re-run tokens per 100
  calls at the default rate, with their ratio (the extra work a consumer pays in compute);
- detection rate per check (impostor) and false alarms per check (honest), in each mode;
- the expected calls until an impostor is caught at the default rate (1 / (rate x detection)).
"""

from __future__ import annotations

import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

import protocol  # noqa: E402
from node.provider.backends import TransformersBackend, ensure_builtin_model  # noqa: E402
from node.verify import SpotCheckConfig, rerun  # noqa: E402

CALLS, MAX_TOKENS = 100, 16
SEED_A, SEED_B = 1234, 99
WORDS = ["alpha", "river", "stone", "cloud", "ember", "maple", "quartz", "violet"]


def request(i: int) -> protocol.Request:
    text = f"{WORDS[i % 8]} {i} {WORDS[(i * 3) % 8]} {WORDS[(i * 5) % 8]}"
    return protocol.Request(session_id=bytes(16), call_seq=i, max_tokens=MAX_TOKENS, temperature_milli=0,
                            messages=(protocol.ChatMessage(role="user", content=text),))


async def serve(backend: TransformersBackend, req: protocol.Request) -> tuple[str, object, int]:
    pieces: list[str] = []

    async def collect(text: str, tokens: int, **_: object) -> None:
        pieces.append(text)

    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    prompt = await backend.count_prompt_tokens(messages)
    gen = await backend.generate(messages, max_tokens=req.max_tokens, temperature_milli=0, top_p_milli=1000,
                                 stop=(), on_piece=collect)
    receipt = types.SimpleNamespace(finish_reason=gen.finish_reason, tokens_out=gen.tokens_out)  # what rerun reads
    return "".join(pieces), receipt, prompt + gen.tokens_out


async def main() -> None:
    models = Path(tempfile.mkdtemp(prefix="inferswarm-bench-honest-"))
    a = TransformersBackend("builtin", ensure_builtin_model(models / "a", seed=SEED_A))
    b = TransformersBackend("builtin", ensure_builtin_model(models / "b", seed=SEED_B))
    await a.start()
    await b.start()
    rate = SpotCheckConfig().rate_permille
    try:
        for name, server in (("honest", a), ("impostor", b)):
            served = 0
            failed = {"exact": 0, "topk": 0}
            cost = {"exact": 0, "topk": 0}
            started = time.perf_counter()
            for i in range(CALLS):
                req = request(i)
                text, receipt, tokens = await serve(server, req)
                served += tokens
                for mode in failed:
                    verdict = await rerun(a, req, text, receipt, exact=mode == "exact")  # type: ignore[arg-type]
                    failed[mode] += not verdict.ok
                    cost[mode] += verdict.tokens
            took = time.perf_counter() - started
            print(f"{name}: {CALLS} calls served {served} tokens (prompt + completion) in {took:.1f} s")
            for mode in failed:
                extra = cost[mode] * rate // 1000
                share = failed[mode] / CALLS
                line = (f"  {mode:5}: re-run tokens per 100 calls at {rate / 10:.0f}% = {extra} "
                        f"(ratio {extra / served:.3f} of served); ")
                if name == "honest":
                    line += f"false alarms {failed[mode]}/{CALLS} checks"
                else:
                    until = 1 / (rate / 1000 * share) if share else float("inf")
                    line += f"detection {share:.0%} per check; expected calls until caught {until:.1f}"
                print(line)
    finally:
        await a.aclose()
        await b.aclose()


if __name__ == "__main__":
    trio.run(main)
