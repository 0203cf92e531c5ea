"""One node per home: node.lock is an OS lock held for the node's life (another process is refused,
naming the holder's pid, and so is a second node in the same process), released when its holder ends however it
ends, and its file never deleted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node._home import Home, HomeInUse, hold_home

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from node._home import Home, hold_home
    with hold_home(Home(Path(sys.argv[1]))):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


def test_another_process_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HomeInUse, match=rf"another node runs on .* \(pid {holder.pid}\)") as caught:
            with hold_home(Home(tmp_path)):
                pass  # pragma: no cover
        assert caught.value.pid == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with hold_home(Home(tmp_path)):  # released with its holder
        assert (tmp_path / "node.lock").read_text().strip() == str(os.getpid())
    assert (tmp_path / "node.lock").exists()


def test_a_killed_holder_leaves_a_stale_pid_that_locks_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=30)
    with hold_home(Home(tmp_path)):
        pass


def test_a_second_node_in_the_same_process_is_refused_too(tmp_path):
    with hold_home(Home(tmp_path)):
        with pytest.raises(HomeInUse, match=rf"\(pid {os.getpid()}\)"):
            with hold_home(Home(tmp_path)):
                pass  # pragma: no cover
        # still held by the outer block: another process is refused
        out = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, input="", text=True,
                             capture_output=True, timeout=60)
        assert out.returncode != 0 and "HomeInUse" in out.stderr
    with hold_home(Home(tmp_path)):  # released by the outer block's end
        pass


async def test_open_swarm_holds_the_home(tmp_path):
    from node import open_swarm

    async with open_swarm(tmp_path / "a", passphrase="pw"):
        with pytest.raises(HomeInUse):
            async with open_swarm(tmp_path / "a", passphrase="pw"):
                pass  # pragma: no cover
    async with open_swarm(tmp_path / "a", passphrase="pw"):  # the first one's end released it
        pass
