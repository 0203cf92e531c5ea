"""What a library user's block raises inside ``open_swarm`` comes out as itself, not wrapped ten
deep in the node's exception groups (whose printing stops at ten levels and hides the cause)."""

from __future__ import annotations

import pytest

from node import open_swarm
from node.consumer import RentError


async def test_an_error_in_the_block_comes_out_as_itself(tmp_path):
    with pytest.raises(RentError, match="no provider offers 'nothing-here'"):
        async with open_swarm(tmp_path / "home", passphrase="swarm-errors") as swarm:
            await swarm.run("nothing-here", "hello", max_tokens=4)
    with pytest.raises(ValueError, match="mine"):
        async with open_swarm(tmp_path / "home", passphrase="swarm-errors"):
            raise ValueError("mine")
