"""The builtin model's folder is built atomically: two processes building at once end with one
good folder (one of them builds), and a folder cut short by a killed build is rebuilt, not loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from node.provider.backends import BUILTIN_MODEL, TransformersBackend, ensure_builtin_model
from tests.e2e.daemons import ROOT

_BUILD = ("import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.WARNING);"
          "from node.provider.backends import ensure_builtin_model;"
          "print(ensure_builtin_model(Path(sys.argv[1])))")


def _marker(folder: Path) -> dict:
    return json.loads((folder / "inferswarm-builtin.json").read_text())


def test_two_processes_building_at_once_end_with_one_good_folder(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    folders = {out.strip() for out, _ in outs}
    assert folders == {str(tmp_path / BUILTIN_MODEL)}
    assert sum("building the builtin model" in err for _, err in outs) == 1  # the other one waited, then found it
    assert _marker(tmp_path / BUILTIN_MODEL)["version"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [BUILTIN_MODEL]  # no temporary folder left


async def test_a_folder_cut_short_by_a_killed_build_is_rebuilt_and_loads(tmp_path):
    folder = tmp_path / BUILTIN_MODEL
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "lla')  # what a build killed mid-write leaves: no marker
    leftover = tmp_path / f".{BUILTIN_MODEL}.build-x1y2"  # a killed build's temporary folder
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 16)

    assert ensure_builtin_model(tmp_path) == folder
    assert _marker(folder)["version"] >= 1 and not leftover.exists()
    backend = TransformersBackend("builtin", folder)
    await backend.start()
    assert await backend.count_prompt_tokens([{"role": "user", "content": "hi"}]) > 0


def test_a_built_folder_is_reused_as_it_is(tmp_path):
    folder = ensure_builtin_model(tmp_path)
    weights = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure_builtin_model(tmp_path) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == weights


async def test_a_folder_of_an_older_version_is_rebuilt_with_the_tool_template(tmp_path):
    folder = ensure_builtin_model(tmp_path)
    (folder / "inferswarm-builtin.json").write_text(json.dumps({"version": 1, "seed": 1234}))  # before tools
    (folder / "tokenizer_config.json").write_text("{}")
    assert ensure_builtin_model(tmp_path) == folder and _marker(folder)["version"] >= 2
    backend = TransformersBackend("builtin", folder)
    await backend.start()
    assert "tools" in backend.features() and "<tool_call>" in backend._tokenizer.chat_template


def test_a_folder_built_by_other_library_releases_is_rebuilt_to_the_same_bytes_as_everywhere(tmp_path):
    """Another transformers release writes another config.json (so another commitment): a folder
    built under other libraries is rebuilt, or two nodes with the same libraries would disagree."""
    from node.provider.backends._commitment import folder_commitment

    folder = ensure_builtin_model(tmp_path / "a")
    fresh = folder_commitment(folder)
    stale = _marker(folder) | {"transformers": "0.0.1"}
    (folder / "inferswarm-builtin.json").write_text(json.dumps(stale))
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")  # as another release would
    assert ensure_builtin_model(tmp_path / "a") == folder
    assert _marker(folder)["transformers"] != "0.0.1"
    assert folder_commitment(folder) == fresh == folder_commitment(ensure_builtin_model(tmp_path / "b"))
