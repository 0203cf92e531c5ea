"""The checked-in ABI and bytecode are what the pinned compiler makes of the checked-in source."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wallet.chain import CONTRACTS, compile_artifact, load_artifact


@pytest.mark.parametrize("name", CONTRACTS)
def test_the_checked_in_artifact_is_the_compiled_source(name):
    checked_in = load_artifact(name)
    source = Path(__file__).resolve().parents[2] / "wallet" / "chain" / "contracts" / f"{name}.vy"
    assert checked_in.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest(), \
        f"{name}.vy changed since its artifact was written: run `make contracts`"
    assert compile_artifact(name) == checked_in, f"{name}.json is not what vyper makes of {name}.vy"


def test_an_unknown_contract_is_a_clear_error():
    with pytest.raises(ValueError, match="no contract named"):
        load_artifact("Nope")
