"""Protocol core costs, as ratios to baselines measured in the same run.

- strict decode of a receipt vs a bare ``msgpack.unpackb`` of the same bytes
  (what strictness and the canonical re-encode check cost);
- sign + verify of a receipt vs bare Ed25519 sign + verify of the same body
  (what field maps and domain tags cost);
- one full metered call through both session machines (request, 4 chunks, receipt,
  counter-signature, each over encode/frame/decode) vs 4 bare Ed25519 signs+verifies.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
import nacl.signing  # noqa: E402

import protocol  # noqa: E402
from tests.support import PROVIDER, Pair  # noqa: E402


def per_second(fn, n: int) -> float:
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append(n / (time.perf_counter() - t))
    return statistics.median(runs)


def main() -> None:
    pair = Pair()
    pair.open()
    receipt = pair.call("hello", [("a", 1), ("b", 1)]).receipt
    data = protocol.encode(receipt)
    body = protocol.signed_bytes(receipt, "provider_sig")
    key = nacl.signing.SigningKey(PROVIDER.seed)
    vk = key.verify_key

    decode = per_second(lambda: protocol.decode(data), 3000)
    raw_decode = per_second(lambda: msgpack.unpackb(data, raw=False), 3000)

    def ours():
        r = protocol.sign(receipt, "provider_sig", PROVIDER)
        protocol.verify(r, "provider_sig", PROVIDER.public_key)

    def bare():
        vk.verify(body, key.sign(body).signature)

    sign_verify, bare_sv = per_second(ours, 1000), per_second(bare, 1000)

    def one_call():
        pair.call("hello", [("a", 1), ("b", 1), ("c", 1), ("d", 1)])

    big = Pair(cap=10**12)
    big.open()
    pair = big
    calls = per_second(one_call, 300)
    bare4 = per_second(lambda: [bare() for _ in range(2)], 300)  # receipt + counter-sign: 2 sign/verify pairs

    print(f"receipt strict decode   {decode:10.0f}/s   bare msgpack {raw_decode:10.0f}/s   ratio {decode / raw_decode:.3f}")
    print(f"receipt sign+verify     {sign_verify:10.0f}/s   bare ed25519 {bare_sv:10.0f}/s   ratio {sign_verify / bare_sv:.3f}")
    print(f"metered call (2 sides)  {calls:10.0f}/s   2x bare s+v  {bare4:10.0f}/s   ratio {calls / bare4:.3f}")


if __name__ == "__main__":
    main()
