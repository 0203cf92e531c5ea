"""libp2p's records reach the application's handlers (where the CLI filters them out unless -v),
never Python's last-resort printer: libp2p's own logging setup stops its logger's propagation
and leaves it without handlers, so its error lines went to stderr bare, past every filter (seen
in node demo about one run in three)."""

from __future__ import annotations

import logging

from node.net._libp2p_fixes import apply


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_libp2p_errors_reach_the_root_handlers_not_the_last_resort(capsys):
    import libp2p.utils.logging  # noqa: F401  (its setup runs on import, as in the node)

    apply()
    keep = _Keep()
    root = logging.getLogger()
    root.addHandler(keep)
    try:
        logging.getLogger("libp2p.protocol_muxer.multiselect_client").error("handshake: write failed")
    finally:
        root.removeHandler(keep)
    assert [r.getMessage() for r in keep.records] == ["handshake: write failed"]
    assert "handshake" not in capsys.readouterr().err
