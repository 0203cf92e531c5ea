"""Keeping providers honest: model commitments, spot checks that re-run sampled calls, and evidence bundles anyone can re-check.

    _rerun          re-running a paid call on the committed weights: exact or top-k comparison, the Verdict
    _spot           SpotChecker: samples settled calls, re-runs them within a budget, acts on a failure
    _evidence_book  the evidence bundles this node holds (its own and gossiped ones), bounded
    _service        a node's verification: checker, book, the evidence topic and confirmation re-runs
                    (imported by the composition root only: it pulls in the network stack)
"""

from ..provider.backends._commitment import file_commitment, folder_commitment, upstream_commitment
from ._evidence_book import EvidenceBook
from ._rerun import Recheck, Verdict, checkable, recheck, rerun
from ._spot import CheckedCall, SpotCheckConfig, SpotChecker

__all__ = [
    "checkable",
    "CheckedCall",
    "EvidenceBook",
    "file_commitment",
    "folder_commitment",
    "Recheck",
    "recheck",
    "rerun",
    "SpotCheckConfig",
    "SpotChecker",
    "upstream_commitment",
    "Verdict",
]
