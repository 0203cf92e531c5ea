"""Adding an offer loads and benchmarks its model before it answers: a model that cannot load
(missing folder, missing key, unreachable upstream) fails with the reason and changes nothing
(offers, config file, listing); replacing an offer's backend swaps what its sessions serve, and
the old backend is closed once the calls it runs have ended."""

from __future__ import annotations

import socket
import time

import pytest
import trio

import wallet
from node import open_swarm
from node._errors import InvalidRequest
from node.provider import Offer
from node.provider._admission import Admission
from node.provider._storefront import LiveBackend, OfferUnloadable, Storefront
from node.provider.backends import Backend, BackendError, Generation, TransformersBackend, ensure_builtin_model
from node.provider.backends._openai import OpenAIBackend
from tests.e2e.fast_upstream import WORDS, fast_upstream
from tests.node.session_rig import _MODELS, session_rig

USER = [{"role": "user", "content": "Say something."}]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens on it once the socket is closed


async def test_an_offer_that_cannot_load_fails_and_changes_nothing(tmp_path):
    async with open_swarm(tmp_path / "p", passphrase="pw") as swarm:
        await swarm.offer("tiny", input_price=1, output_price=2)
        store = swarm.service.storefront
        assert "tiny" in store.benchmarks  # measured before the offer answered
        config = swarm.service.home.config.read_bytes()
        listing = swarm.service.market._own
        bad = [(f"transformers:{tmp_path / 'no-such-folder'}", InvalidRequest, "no model folder"),
               ("openai:http://127.0.0.1:9/v1#no-such-key", InvalidRequest, "no API key named 'no-such-key'"),
               (f"openai:http://127.0.0.1:{_closed_port()}/v1", BackendError, "upstream 127.0.0.1 failed")]
        for spec, error, reason in bad:
            for model in ("tiny", "new-model"):  # replacing an offer, and adding one
                with pytest.raises(error, match=reason) as caught:
                    await swarm.offer(model, backend=spec, input_price=5, output_price=5)
                assert f"cannot offer {model!r}" in str(caught.value)
                if error is BackendError:  # the upstream's failure: a gateway's error, not the request's
                    assert not isinstance(caught.value, InvalidRequest)
                else:
                    assert caught.value.field == "backend"
                assert [o.to_json() for o in swarm.service.offers()] == [
                    Offer(model="tiny", backend="builtin", input_price=1, output_price=2).to_json()]
                assert swarm.service.home.config.read_bytes() == config
                assert swarm.service.market._own == listing
                assert store.healthy("tiny") and store.loaded_backend("tiny").spec == "builtin"


async def test_replacing_the_backend_serves_the_new_model_from_the_next_call():
    """A session opened on the builtin model: after the offer's backend becomes an OpenAI upstream,
    its next call (and a new session's) is the upstream's text."""
    words = "".join(f"w{i} " for i in range(WORDS))
    the_offer = Offer(model="m", backend="builtin", input_price=100_000, output_price=200_000)
    backends: dict[str, Backend] = {"m": TransformersBackend("builtin", ensure_builtin_model(_MODELS))}
    with fast_upstream() as url:
        async with session_rig({"m": the_offer}, backends, tag="swap") as rig:
            store = rig.provider_service.storefront
            async with rig.session(await rig.open_channel(cap=500_000)) as session:
                before = await session.call(USER, WORDS)
                assert before.text != words  # the builtin model's noise
                upstream = OpenAIBackend.from_spec(f"openai:{url}", None, "m")
                await upstream.start()  # the rig starts a model's first backend only
                backends["m"] = upstream  # what the rig's factory starts next
                await store.add_offer(Offer(model="m", backend=f"openai:{url}", input_price=100_000,
                                            output_price=200_000))
                after = await session.call(USER, WORDS)  # the session opened before the swap
                assert after.text == words
            async with rig.session(await rig.open_channel(cap=500_000)) as fresh:
                assert (await fresh.call(USER, WORDS)).text == words
            assert store.loaded_backend("m").spec == f"openai:{url}"


async def test_a_replaced_offer_is_saved_with_its_new_backend(tmp_path):
    with fast_upstream() as url:
        async with open_swarm(tmp_path / "p", passphrase="pw") as swarm:
            await swarm.offer("tiny", input_price=100_000, output_price=200_000)
            live = swarm.service.storefront.loaded_backend("tiny")
            await swarm.offer("tiny", backend=f"openai:{url}", input_price=100_000, output_price=200_000)
            assert swarm.service.storefront.loaded_backend("tiny") is live  # what sessions hold, now the upstream
            assert live.spec == f"openai:{url}" and await _text(live) == "".join(f"w{i} " for i in range(WORDS))
            assert f'backend = "openai:{url}"' in swarm.service.home.config.read_text()
            assert swarm.service.status()["models"]["tiny"]["healthy"]


class _Scripted(Backend):
    """A backend whose generation waits for ``release``; it records its closing."""

    def __init__(self, spec: str) -> None:
        self.spec, self.closed, self.started, self.release = spec, False, trio.Event(), trio.Event()
        self.hold = False

    async def count_prompt_tokens(self, messages):
        return 1

    async def generate(self, messages, *, max_tokens, temperature_milli, top_p_milli, stop, on_piece):
        if self.hold:
            self.started.set()
            await self.release.wait()
        await on_piece(self.spec, 1)
        return Generation("stop", 1)

    async def aclose(self):
        self.closed = True


def _storefront(made: dict[str, _Scripted]) -> Storefront:
    async def factory(offer: Offer) -> Backend:
        if offer.backend == "transformers:/broken":
            raise BackendError("no model folder at /broken")
        made[offer.backend] = _Scripted(offer.backend)
        return made[offer.backend]

    return Storefront(wallet.Identity.generate(), (), factory, Admission(), wall_clock=time.time)


async def _text(live: Backend) -> str:
    pieces: list[str] = []

    async def on_piece(text: str, tokens: int) -> None:
        pieces.append(text)

    await live.generate([], max_tokens=WORDS, temperature_milli=0, top_p_milli=1000, stop=(), on_piece=on_piece)
    return "".join(pieces)


async def test_the_old_backend_finishes_its_running_call_then_closes():
    made: dict[str, _Scripted] = {}
    store = _storefront(made)
    await store.add_offer(Offer(model="m", backend="builtin", input_price=1, output_price=1))
    live = await store.backend_for(store.offer("m"))
    assert isinstance(live, LiveBackend)
    old = made["builtin"]
    old.hold = True
    running: list[str] = []
    async with trio.open_nursery() as nursery:
        async def call() -> None:
            running.append(await _text(live))

        nursery.start_soon(call)
        await old.started.wait()
        await store.add_offer(Offer(model="m", backend="openai:http://127.0.0.1:1/v1", input_price=1, output_price=1))
        assert await _text(live) == "openai:http://127.0.0.1:1/v1"  # a call after the swap: the new backend
        assert not old.closed  # its running call is not cut off
        old.release.set()
    assert running == ["builtin"] and old.closed
    with pytest.raises(OfferUnloadable, match="no model folder"):
        await store.add_offer(Offer(model="m", backend="transformers:/broken", input_price=1, output_price=1))
    assert store.offer("m").backend == "openai:http://127.0.0.1:1/v1" and not made["openai:http://127.0.0.1:1/v1"].closed
    assert store.remove_offer("m")
    with pytest.raises(BackendError, match="no longer offered"):
        await _text(live)


async def test_an_offer_in_the_config_that_cannot_load_is_not_sold(tmp_path):
    """The offers a node starts with are loaded in the background: one that cannot load is
    withdrawn (unhealthy, with the reason), the others are sold."""
    from node import Home, init_home
    from node._config import save_offers

    init_home(tmp_path / "p", "pw")
    save_offers(Home(tmp_path / "p").config, (
        Offer(model="tiny", backend="builtin", input_price=1, output_price=1),
        Offer(model="broken", backend=f"transformers:{tmp_path / 'no-such-folder'}", input_price=1, output_price=1)))
    async with open_swarm(tmp_path / "p", passphrase="pw") as swarm:
        store = swarm.service.storefront
        with trio.fail_after(60):
            while "tiny" not in store.benchmarks or "broken" not in swarm.service.health.unhealthy:
                await trio.sleep(0.05)  # the background load has no event to wait on
        assert {m.name for m in swarm.service.market._own.models} == {"tiny"}
        assert "no model folder" in swarm.service.health.unhealthy["broken"]


async def test_an_offer_whose_config_cannot_be_written_changes_nothing():
    made: dict[str, _Scripted] = {}
    saved: list[tuple[Offer, ...]] = []

    def persist(offers: tuple[Offer, ...]) -> None:
        if any(o.backend != "builtin" for o in offers):
            raise OSError(28, "No space left on device")
        saved.append(offers)

    async def factory(offer: Offer) -> Backend:
        made[offer.backend] = _Scripted(offer.backend)
        return made[offer.backend]

    store = Storefront(wallet.Identity.generate(), (), factory, Admission(), persist=persist, wall_clock=time.time)
    await store.add_offer(Offer(model="m", backend="builtin", input_price=1, output_price=1))
    with pytest.raises(OSError, match="No space"):
        await store.add_offer(Offer(model="m", backend="openai:http://127.0.0.1:1/v1", input_price=1, output_price=1))
    assert store.offer("m").backend == "builtin" and store.loaded_backend("m").spec == "builtin"
    assert made["openai:http://127.0.0.1:1/v1"].closed and not made["builtin"].closed and len(saved) == 1
