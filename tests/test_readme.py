"""The README's library example runs, exactly as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example:library -->\s*```python\n(.*?)```\s*<!-- /example:library -->", text, re.S)
    assert block, "the README lost its library example"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=ROOT,
                         stdin=subprocess.DEVNULL)
    # an exception group prints its leaves deep inside 10 levels of frames: name them first
    leaves = [line.strip(" |") for line in out.stderr.splitlines()
              if re.match(r"^[\s|+-]*[A-Za-z_.]*(Error|Exception|Failed|Unreachable)\b.*", line)
              and "Traceback" not in line]
    assert out.returncode == 0, "\n".join(leaves[-5:]) + "\n" + out.stderr[-2000:]
    assert "cost:" in out.stdout and "µc so far" in out.stdout and "'available'" in out.stdout
    assert "tool call: {'name': 'get_weather'" in out.stdout and "384 dims" in out.stdout, out.stdout
