"""The README's shell walkthroughs run as written, top to bottom, in one bash (``set -euo
pipefail``: any command that fails fails the test), as a reader would paste them. Only the base
of the homes (``/tmp/``) becomes the test's own folder; the nodes are the walkthroughs' own
(``node start … &``), and every process they leave is stopped here (their process group).

The blocks are the ``<!-- walkthrough:NAME -->`` ones, in the README's order."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"<!-- walkthrough:([\w-]+) -->\s*```sh\n(.*?)```\s*<!-- /walkthrough:\1 -->", re.S)
WALKTHROUGHS = ("market", "renting", "escrow")


def walkthroughs(text: str) -> dict[str, str]:
    """The README's walkthrough blocks by name, in order."""
    return {m.group(1): m.group(2) for m in _BLOCK.finditer(text)}


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # `node` is the venv's, as with it activated
    env["COLUMNS"] = "80"
    return env


def _stop_group(pgid: int, timeout: float = 30.0) -> None:
    """SIGTERM every process left in the group (the walkthroughs' nodes), wait, then SIGKILL."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_readme_has_the_walkthroughs():
    found = walkthroughs((ROOT / "README.md").read_text())
    assert tuple(found) == WALKTHROUGHS, f"the README's walkthroughs are {tuple(found)}"


def test_the_readme_walkthroughs_run_as_written(tmp_path):
    blocks = walkthroughs((ROOT / "README.md").read_text())
    script = "set -euo pipefail\n" + "".join(f"echo \"### walkthrough {name} (at ${{SECONDS}} s)\" >&2\n{body}"
                                             for name, body in blocks.items()) + 'echo "### done in ${SECONDS} s" >&2\n'
    base = tmp_path / "homes"
    base.mkdir()
    (tmp_path / "walkthrough.sh").write_text(script.replace("/tmp/", f"{base}/"))
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    # files, not pipes: the nodes the script leaves running would hold a pipe open after it exits
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(["bash", str(tmp_path / "walkthrough.sh")], cwd=tmp_path,
                                env=_env(Path(sys.executable).parent), stdin=subprocess.DEVNULL, stdout=out_f,
                                stderr=err_f, start_new_session=True)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(proc.pid)
            proc.wait()
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode != -signal.SIGTERM, f"the walkthroughs did not finish in 240 s:\n{err[-4000:]}"
    assert proc.returncode == 0, f"a README command failed ({proc.returncode}):\n{err[-4000:]}\n{out[-2000:]}"
    # what the reader is told happened
    assert re.search(r"channel [0-9a-f]{32} stays open", err), err[-3000:]  # chat --channel left it open
    assert re.search(r"(nothing more to pay: .*|paid \S+ credits); \S+ credits of 4.00 credits claimed", out), out[-2000:]
    assert "closed channel" in out and "refunded" in out, out[-2000:]
    assert '"available"' in out and "integrity:     ok" in out, out[-2000:]
    assert "Traceback" not in err, err[-4000:]
    for home in ("a", "p", "c"):
        assert not (base / home / "daemon.json").exists(), f"the {home} node did not stop cleanly"
