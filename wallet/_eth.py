"""The Ethereum libraries, imported without their side effect on the interpreter.

py_ecc (under eth-account) raises the recursion limit to 100,000 when first imported, and py-evm
(under eth-tester) to 12,288. A limit that deep lets a hostile, deeply nested input — a JSON
schema in a stranger's request, say — overflow the C stack and kill the whole process, where the
default limit raises ``RecursionError``, which the code turns into a refusal. So this project
imports them only under ``kept_recursion_limit``, which puts the limit back; once imported, they
are cached and never set it again. (Our contracts call one level deep: py-evm needs no more.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["kept_recursion_limit", "load_eth_libraries"]


@contextlib.contextmanager
def kept_recursion_limit() -> Iterator[None]:
    """The interpreter's recursion limit as it was before the block, whatever the block imports."""
    limit = sys.getrecursionlimit()
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def load_eth_libraries(evm: bool = False) -> None:
    """Import eth-account and web3 (and, with ``evm``, eth-tester's py-evm backend) with the limit kept."""
    with kept_recursion_limit():
        import eth_account  # noqa: F401
        import web3  # noqa: F401

        if evm:
            import eth  # noqa: F401  (py-evm)
            import eth_tester  # noqa: F401
