"""Settling on a chain leaves the interpreter's recursion limit alone: py_ecc and py-evm raise it on
import, and a limit that deep turns a stranger's deeply nested JSON into a C stack overflow (a
crashed node) instead of the RecursionError the code refuses it with."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.daemons import ROOT

CODE = """
import json, sys, trio
before = sys.getrecursionlimit()
import wallet.chain
from node.chain import EMBEDDED, open_chain_link, parse_chain_spec
from wallet import Identity
link = trio.run(open_chain_link, parse_chain_spec(EMBEDDED), Identity(bytes(32)))
import x402.http.utils, x402.mechanisms.evm.exact
assert sys.getrecursionlimit() == before, (before, sys.getrecursionlimit())
try:
    json.loads("[" * 200_000)
except RecursionError:
    print("refused")
"""


def test_the_recursion_limit_survives_the_ethereum_libraries():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "refused", (out.returncode, out.stderr[-2000:])
