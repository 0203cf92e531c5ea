"""config.toml: offers round-trip with comments kept; bad values are named."""

from __future__ import annotations

import stat

import pytest

from node import ConfigError, Home, init_home
from node._config import load_config, save_offers
from node.provider._offers import Offer, parse_backend


@pytest.fixture
def home(tmp_path):
    import nacl.pwhash

    init_home(tmp_path, "pw", opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN, memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN)
    return Home(tmp_path)


def test_offers_round_trip_and_comments_survive(home):
    offers = (Offer(model="tiny", backend="builtin", input_price=500_000, output_price=1_500_000),
              Offer(model="big", backend="openai:http://127.0.0.1:8000/v1#up", input_price=1, output_price=2,
                    max_context=8192, min_charge=3, rate_limit=60, max_concurrent=2))
    save_offers(home.config, offers)
    assert load_config(home.config).offers == offers
    text = home.config.read_text()
    assert "# Inferswarm node configuration" in text and "# escrow agents" in text
    assert stat.S_IMODE(home.config.stat().st_mode) == 0o600
    save_offers(home.config, ())
    assert load_config(home.config).offers == ()
    assert "# libp2p listen addresses" in home.config.read_text()


@pytest.mark.parametrize("spec", ["builtin", "transformers:/models/x", "openai:https://api.example/v1#key",
                                  "openai:http://127.0.0.1:8000/v1", "llamacpp:/m.gguf"])
def test_backend_specs(spec):
    assert parse_backend(spec) == spec


@pytest.mark.parametrize("spec", ["", "gpt", "openai:ftp://x", "transformers:", "builtin:x"])
def test_bad_backend_specs(spec):
    with pytest.raises(ValueError, match="backend"):
        parse_backend(spec)


@pytest.mark.parametrize("field,value", [("input_price", -1), ("input_price", 0.5), ("max_context", 0), ("model", "")])
def test_bad_offer_values(field, value):
    fields = dict(model="m", backend="builtin", input_price=1, output_price=1)
    fields[field] = value
    with pytest.raises(ValueError):
        Offer(**fields)


def test_bad_config_names_the_key(home):
    home.config.write_text('[node]\nlisten = "not a list"\n')
    with pytest.raises(ConfigError, match="listen"):
        load_config(home.config)
    home.config.write_text('[[offers]]\nmodel = "m"\nbackend = "builtin"\ninput_price = 0.5\noutput_price = 1\n')
    with pytest.raises(ConfigError, match="offers"):
        load_config(home.config)
    home.config.write_text("[node\n")
    with pytest.raises(ConfigError):
        load_config(home.config)
    home.config.write_text('[node]\naccept_escrow = ["not-a-peer"]\n')
    with pytest.raises(ConfigError, match="accept_escrow"):
        load_config(home.config)


def test_announce_and_relay_are_read_and_checked(home):
    home.config.write_text('[node]\nannounce = ["/ip4/203.0.113.7/tcp/4001", "/dns4/gpu.example.org/tcp/4001"]\n'
                           'relay = true\n')
    config = load_config(home.config)
    assert config.announce == ("/ip4/203.0.113.7/tcp/4001", "/dns4/gpu.example.org/tcp/4001")
    assert config.relay is True
    for bad in ('"/ip4/0.0.0.0/tcp/4001"', '"203.0.113.7:4001"', '"/ip4/203.0.113.7/udp/4001"'):
        home.config.write_text(f"[node]\nannounce = [{bad}]\n")
        with pytest.raises(ConfigError, match=r"config.toml:2: \[node\] announce: .*"):
            load_config(home.config)
    home.config.write_text('[node]\nrelay = "yes"\n')
    with pytest.raises(ConfigError, match=r"\[node\] relay must be true or false"):
        load_config(home.config)


def test_announce_on_the_command_line_comes_first_and_is_checked(home):
    from node._node import resolve_config

    home.config.write_text('[node]\nannounce = ["/ip4/203.0.113.7/tcp/4001"]\n')
    config = resolve_config(home, announce=("/ip4/198.51.100.1/tcp/9",), relay=True)
    assert config.announce == ("/ip4/198.51.100.1/tcp/9", "/ip4/203.0.113.7/tcp/4001") and config.relay
    with pytest.raises(ValueError, match="0.0.0.0"):
        resolve_config(home, announce=("/ip4/0.0.0.0/tcp/9",))


def test_the_chain_and_x402_are_read_and_checked(home):
    from node._node import resolve_config

    escrow = "0x" + "ab" * 20
    home.config.write_text(f'[node]\nchain = "evm:http://127.0.0.1:8545#{escrow}"\nx402 = true\n')
    config = load_config(home.config)
    assert (config.chain, config.x402) == (f"evm:http://127.0.0.1:8545#{escrow}", True)
    for bad, says in (('"evm:ftp://host#' + escrow + '"', "http:// or https://"), ('"evm:http://h:1#0x12"', "40 hex"),
                      ('"ethereum"', "evm:embedded")):
        home.config.write_text(f"[node]\nchain = {bad}\n")
        with pytest.raises(ConfigError, match=rf"config.toml:2: \[node\] chain: .*{says}"):
            load_config(home.config)
    home.config.write_text("[node]\nx402 = true\n")
    with pytest.raises(ConfigError, match=r"x402 takes payments on a chain"):
        load_config(home.config)
    home.config.write_text("")
    assert resolve_config(home, chain="evm:embedded", x402=True).chain == "evm:embedded"
    with pytest.raises(ValueError, match="--chain"):
        resolve_config(home, x402=True)
    with pytest.raises(ValueError, match="a chain is"):
        resolve_config(home, chain="evm:nowhere")
