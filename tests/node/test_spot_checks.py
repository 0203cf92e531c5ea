"""Spot checks catch a provider serving another model than it committed to, and never an honest one."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest

import protocol
from node.consumer import TrustBook
from node.provider._offers import Offer
from node.provider.backends import TransformersBackend
from node.verify import CheckedCall, EvidenceBook, SpotCheckConfig, SpotChecker
from tests.node.impostor import SEED_A, SEED_B, Impostor, builtin_folder
from tests.node.session_rig import session_rig
from tests.support import identity

_MODELS = Path(tempfile.gettempdir()) / "inferswarm-test-models" / "spot"
OFFER = Offer(model="m", backend="builtin", input_price=100, output_price=200, max_context=2048)


async def _started(seed: int) -> TransformersBackend:
    backend = TransformersBackend("builtin", builtin_folder(_MODELS, seed))
    await backend.start()
    return backend


def _prompt(i: int) -> list[dict[str, str]]:
    words = ["alpha", "river", "stone", "cloud", "ember", "maple", "quartz", "violet"]
    return [{"role": "user", "content": f"{words[i % 8]} {i} {words[(i * 3) % 8]}"}]


async def _calls(served, claimed, checker: SpotChecker, n: int, *, stop_when_caught: bool = True,
                 tag: str = "spot") -> int:
    """Make up to ``n`` greedy paid calls to a provider serving ``served`` under ``claimed``'s
    commitment, offering each to ``checker``; returns how many were made."""
    commitment = claimed.commitment()
    async with session_rig({"m": OFFER}, {"m": served}, tag=tag) as rig:
        channel = await rig.open_channel(cap=5_000_000)
        made = 0

        def settled(result) -> None:
            checker.offer(CheckedCall(rig.provider_id, "m", commitment, claimed.reproducible(), result.request,
                                      result.text, result.receipt))

        async with rig.session(channel, commitment=protocol.commitment_id(commitment), on_settled=settled) as s:
            for i in range(n):
                await s.call(_prompt(i), 12, temperature_milli=0)
                made += 1
                while True:  # run the queued checks now, in order
                    try:
                        call = checker._receive.receive_nowait()
                    except Exception:
                        break
                    await checker.check(call)
                if stop_when_caught and checker.stats["failed"]:
                    break
        return made


@pytest.fixture
async def pair(tmp_path):
    a, b = await _started(SEED_A), await _started(SEED_B)
    yield a, b, tmp_path
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("reproducible", [True, False], ids=["exact", "topk"])
async def test_an_impostor_is_caught_within_a_bounded_number_of_calls_at_ten_percent(pair, reproducible):
    honest, other, tmp = pair
    claimed = honest if reproducible else _Unreproducible(honest)
    trust = TrustBook(tmp / "trust.db")
    book = EvidenceBook(tmp / "evidence.db")
    checker = SpotChecker(identity("spot-consumer"), SpotCheckConfig(rate_permille=100), trust=trust,
                          evidence=book, draw=random.Random(16).randrange)
    checker.hold(claimed)
    made = await _calls(Impostor(other, claimed), claimed, checker, 60, tag=f"imp-{reproducible}")
    assert checker.stats["failed"] == 1 and made <= 60, checker.stats
    provider = identity(f"imp-{reproducible}-provider").peer_id
    assert trust.get(provider).score == 0 and trust.get(provider).caught == 1 and trust.get(provider).violator
    (evidence, confirmed), = book.against(provider)
    assert confirmed and protocol.check_evidence(evidence).temperature_milli == 0
    assert evidence.mode == ("exact" if reproducible else "topk")
    trust.close()
    book.close()


async def test_an_honest_provider_passes_hundreds_of_checks_in_both_modes(pair):
    honest, _, tmp = pair
    exact = SpotChecker(identity("spot-exact"), SpotCheckConfig(rate_permille=1000))
    topk = SpotChecker(identity("spot-topk"), SpotCheckConfig(rate_permille=1000))
    exact.hold(honest)
    topk.hold(_Unreproducible(honest))

    class Both:
        stats = exact.stats
        _receive = exact._receive

        @staticmethod
        def offer(call):
            exact.offer(call)
            topk.offer(CheckedCall(call.provider, call.model, call.commitment, False, call.request, call.text,
                                   call.receipt))

        @staticmethod
        async def check(call):
            await exact.check(call)
            await topk.check(topk._receive.receive_nowait())

    await _calls(honest, honest, Both, 150, stop_when_caught=False, tag="honest")
    assert exact.stats["checked"] == topk.stats["checked"] == 150
    assert exact.stats["failed"] == topk.stats["failed"] == 0, (exact.stats, topk.stats)


class _Unreproducible(Impostor):
    """The same backend, saying its greedy decoding is not reproducible (a GPU's): top-k mode."""

    def __init__(self, backend) -> None:
        super().__init__(backend, backend)

    def reproducible(self) -> bool:
        return False

    async def start(self) -> None:
        return None
