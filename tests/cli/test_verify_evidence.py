"""``node verify-evidence``: a genuine bundle is valid and (re-run on the committed weights)
confirmed; a tampered one is refused; a lying verifier's is not confirmed. One or two plain lines."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from node.verify import CheckedCall, SpotCheckConfig, SpotChecker
from tests.cli.test_errors import one_clear_line, run
from tests.node.impostor import SEED_A, SEED_B, Impostor
from tests.node.test_spot_checks import _calls, _started
from tests.support import identity


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(caught, lying): a bundle against an impostor, and a false one against an honest provider."""
    import trio

    async def make():
        honest, other = await _started(SEED_A), await _started(SEED_B)
        try:
            checker = SpotChecker(identity("cli-verifier"), SpotCheckConfig(rate_permille=1000))
            checker.hold(honest)
            made = []
            checker.on_evidence = lambda e: _append(made, e)
            await _calls(Impostor(other, honest), honest, checker, 1, tag="cli-imp")
            honest_calls = SpotChecker(identity("cli-liar"), SpotCheckConfig(rate_permille=1000))
            honest_calls.hold(honest)
            seen: list[CheckedCall] = []
            honest_calls.check = lambda call: _append(seen, call)  # keep the call; no re-run
            await _calls(honest, honest, honest_calls, 1, tag="cli-honest")
            call = seen[0]
            lie = protocol.sign(protocol.Evidence(
                verifier=identity("cli-liar").peer_id, receipt=call.receipt, request=protocol.encode(call.request),
                commitment=call.commitment, provider_text=call.text, verifier_text="not " + call.text,
                mode="exact", issued_at=1), "sig", identity("cli-liar"))
            return made[0], lie
        finally:
            await honest.aclose()
            await other.aclose()

    caught, lie = trio.run(make)
    folder = tmp_path_factory.mktemp("evidence")
    (folder / "caught.evidence").write_bytes(protocol.encode(caught))
    (folder / "lie.evidence").write_bytes(protocol.encode(lie))
    tampered = protocol.encode(dataclasses.replace(caught, verifier_text="something else"))
    (folder / "tampered.evidence").write_bytes(tampered)
    return folder


async def _append(items, item):
    items.append(item)


def test_a_genuine_bundle_is_valid_and_a_rerun_on_the_weights_confirms_it(bundles, tmp_path):
    out = run("verify-evidence", str(bundles / "caught.evidence"))
    assert out.returncode == 0 and out.stdout.startswith("valid: provider "), (out.stdout, out.stderr)
    assert "--backend" in out.stderr and "Traceback" not in out.stderr
    out = run("verify-evidence", "--home", str(tmp_path / "home"), "--backend", "builtin",
              str(bundles / "caught.evidence"), timeout=180)
    assert out.returncode == 0, out.stderr
    assert "confirmed: the re-run here disagrees with the provider too" in out.stdout


def test_a_tampered_bundle_is_refused(bundles):
    one_clear_line(run("verify-evidence", str(bundles / "tampered.evidence")), "refused: ")


def test_a_lying_verifiers_bundle_is_valid_but_not_confirmed(bundles, tmp_path):
    out = run("verify-evidence", "--home", str(tmp_path / "home"), "--backend", "builtin",
              str(bundles / "lie.evidence"), timeout=180)
    one_clear_line(out, "not confirmed: the re-run here agrees with the provider")
