"""The outbox in the engine: per-destination lanes, whole-association deadlines, stops."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pynetdicom import evt

from service.values import StudyState
from tests.conftest import shared_file
from tests.helpers import copy_series
from tests.peers import Peer, TrickleProxy
from tests.test_engine import make_engine, scan

TIMEOUT = 3.0


def _pacs(port: int, ae_title: str) -> str:
    where = f'host = "127.0.0.1", port = {port}, ae_title = "{ae_title}"'
    return f"{{ {where}, timeout_seconds = {TIMEOUT} }}"


def _hang_until(release: threading.Event) -> Callable[[evt.Event], int]:
    """A C-STORE handler that answers only once ``release`` is set (a hung PACS)."""

    def hang(_event: evt.Event) -> int:
        release.wait(60)
        return 0x0000

    return hang


def test_hung_and_trickling_pacs_delay_no_other_gateway(
    tmp_path: Path,
    start_peer: Callable[..., Peer],
    start_proxy: Callable[..., TrickleProxy],
) -> None:
    release = threading.Event()
    hung = start_peer(on_store=_hang_until(release), ae_title="HUNG")
    slow = start_peer(ae_title="SLOW")
    trickle = start_proxy(slow.port, interval=0.5)
    healthy = start_peer(ae_title="HEALTHY")
    extra = "\n".join(
        f"[gateways.{gid}]\npacs = {_pacs(port, ae)}"
        for gid, port, ae in (
            ("1", hung.port, "HUNG"),
            ("2", trickle.port, "SLOW"),
            ("3", healthy.port, "HEALTHY"),
        )
    )
    uids = {
        gid: copy_series(shared_file("series/ct-4-noise"), tmp_path / f"INPUT/gateway_{gid}", 2)[0]
        for gid in ("1", "2", "3")
    }
    engine = make_engine(tmp_path, extra)
    try:
        scan(engine)
        deadline = time.monotonic() + 60
        states: dict[str, StudyState | None] = {}
        while time.monotonic() < deadline:
            engine.tick()
            states = {
                gid: (engine.ledger.study_state(gid, uid) or (None, ""))[0]
                for gid, uid in uids.items()
            }
            if states["3"] == StudyState.SENT:
                break
            engine.wait(0.05)
        healthy_sent_while = dict(states)
        sending_since = time.monotonic()
        while time.monotonic() < deadline and engine.busy:
            engine.tick()
            engine.wait(0.05)
        ended_after = time.monotonic() - sending_since
        final = {gid: engine.ledger.study_state(gid, uid) for gid, uid in uids.items()}
        sends = {
            gid: [dict(s) for r in engine.ledger.runs(gid) for s in engine.ledger.sends(r.run_id)]
            for gid in uids
        }
    finally:
        release.set()
        engine.close()
    # gateway 3's study went out while the other two sends were still open
    assert healthy_sent_while["3"] == StudyState.SENT
    assert healthy_sent_while["1"] == StudyState.SENDING
    assert healthy_sent_while["2"] == StudyState.SENDING
    # the whole association is bounded: each bad send ends timed_out near TIMEOUT
    assert ended_after < 5 * TIMEOUT
    for gid in ("1", "2"):
        state, reason = final[gid]  # type: ignore[misc]
        assert state == StudyState.SEND_FAILED and "timed_out" in reason, (gid, reason)
        assert [s["state"] for s in sends[gid]] == ["timed_out"]
    assert [s["state"] for s in sends["3"]] == ["success"]
    assert hung.connections == 1 and slow.connections == 1 and healthy.connections == 1


def test_a_stop_aborts_open_sends_and_records_them_interrupted(
    tmp_path: Path, start_peer: Callable[..., Peer]
) -> None:
    release = threading.Event()
    hung = start_peer(on_store=_hang_until(release), ae_title="HUNG")
    extra = f'[pacs]\nhost = "127.0.0.1"\nport = {hung.port}\nae_title = "HUNG"\n'
    uid, _ = copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_1", 2)
    engine = make_engine(tmp_path, extra)
    try:
        scan(engine)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and hung.requests == 0:
            engine.tick()
            engine.wait(0.05)
        assert (engine.ledger.study_state("1", uid) or (None,))[0] == StudyState.SENDING
        t0 = time.monotonic()
        engine.finish_in_flight(10)  # what SIGTERM does
        stopped_in = time.monotonic() - t0
        state, reason = engine.ledger.study_state("1", uid)  # type: ignore[misc]
        (run,) = engine.ledger.runs("1")
        (send,) = engine.ledger.sends(run.run_id)
    finally:
        release.set()
        engine.close()
    assert stopped_in < 5  # not the 30 s association timeout
    assert state == StudyState.SEND_FAILED and "interrupted" in reason
    assert send["state"] == "interrupted"
