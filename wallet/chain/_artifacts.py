"""The contracts' compiled artifacts: ABI and bytecode, checked in beside their Vyper source.

Nodes never compile: they deploy and call what ``contracts/NAME.json`` holds, so a node needs no
compiler and every node speaks to byte-identical contracts. The test suite recompiles each source
with the pinned compiler (``vyper`` is a test dependency) and compares, so the checked-in
artifacts cannot drift from the source; ``make contracts`` rewrites them after a change.

The contracts target the Shanghai EVM (``# pragma evm-version``): no Cancun opcodes, so the
in-process EVM, ganache and hardhat all run them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CONTRACTS", "Artifact", "load_artifact", "compile_artifact", "write_artifacts"]

CONTRACTS = ("Stablecoin", "Escrow")
COMPILER = "vyper 0.4.3"
_FOLDER = Path(__file__).resolve().parent / "contracts"


@dataclass(frozen=True)
class Artifact:
    """One compiled contract: what deploying and calling it needs."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str  # 0x-prefixed init code
    runtime: str  # 0x-prefixed code a deployment holds (before its immutables, which Vyper appends)
    source_sha256: str
    compiler: str

    def as_json(self) -> dict[str, Any]:
        return {"contract": self.name, "compiler": self.compiler, "source_sha256": self.source_sha256,
                "abi": self.abi, "bytecode": self.bytecode, "bytecode_runtime": self.runtime}


def _source(name: str) -> bytes:
    return (_FOLDER / f"{name}.vy").read_bytes()


def load_artifact(name: str) -> Artifact:
    """The checked-in artifact of contract ``name`` (one of ``CONTRACTS``).

    Raises:
        ValueError: an unknown contract name.
        OSError: the artifact file is missing (a broken install).
    """
    if name not in CONTRACTS:
        raise ValueError(f"no contract named {name!r} (there are: {', '.join(CONTRACTS)})")
    data = json.loads((_FOLDER / f"{name}.json").read_text())
    return Artifact(name=data["contract"], abi=data["abi"], bytecode=data["bytecode"],
                    runtime=data["bytecode_runtime"], source_sha256=data["source_sha256"], compiler=data["compiler"])


def compile_artifact(name: str) -> Artifact:
    """Compile ``contracts/NAME.vy`` with the pinned Vyper (a test dependency).

    Raises:
        RuntimeError: the installed compiler is not the pinned one.
    """
    import vyper

    if f"vyper {vyper.__version__}" != COMPILER:
        raise RuntimeError(f"the contracts are built with {COMPILER}; this is vyper {vyper.__version__}")
    source = _source(name)
    out = vyper.compile_code(source.decode(), output_formats=["abi", "bytecode", "bytecode_runtime"],
                             contract_path=f"{name}.vy")
    return Artifact(name=name, abi=out["abi"], bytecode=out["bytecode"], runtime=out["bytecode_runtime"],
                    source_sha256=hashlib.sha256(source).hexdigest(), compiler=COMPILER)


def write_artifacts() -> list[Path]:
    """Recompile every contract and write its artifact (what ``make contracts`` runs)."""
    written = []
    for name in CONTRACTS:
        path = _FOLDER / f"{name}.json"
        path.write_text(json.dumps(compile_artifact(name).as_json(), indent=1, sort_keys=True) + "\n")
        written.append(path)
    return written
