"""Send lanes: per-destination associations, against real pynetdicom peers."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import evt

from service import sender
from service.config import DEFAULT_UID_ROOT, PacsConfig
from service.sender import INTERRUPTED_REASON, SendHandle, SendResult, SendStatus
from service.sendlanes import SendLanes, lane_key
from service.uids import UidFactory
from tests.helpers import stored_uid
from tests.peers import Peer, TrickleProxy, copy_with_new_uids

#: Generous bound for a send with timeout_seconds=3: proves the bound, is no benchmark.
BOUND_S = 15.0
#: How long a test waits for something that must happen (a peer reached, a send ended).
WAIT_S = 20.0


@pytest.fixture
def studies(tmp_path: Path) -> list[Path]:
    """Six one-instance studies (CT), each with its own UIDs."""
    uids = UidFactory(DEFAULT_UID_ROOT, "test-lanes", uuid.uuid4().hex)
    return [copy_with_new_uids("CT_small.dcm", tmp_path, uids, f"s{i}") for i in range(6)]


@pytest.fixture
def lanes() -> Iterator[SendLanes]:
    lanes = SendLanes()
    yield lanes
    lanes.cancel_all()
    lanes.close()


class Stall:
    """A C-STORE handler that blocks on the instances it is told to, until released."""

    def __init__(self, uids: set[str] | None = None) -> None:
        self.uids = uids  # None: every instance
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, event: evt.Event) -> int:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if self.uids is None or stored_uid(event) in self.uids:
                self.entered.release()
                self.release.wait(timeout=60)
        finally:
            with self._lock:
                self.active -= 1
        return 0x0000

    def wait_entered(self, count: int = 1) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=WAIT_S), "the peer never got the C-STORE"


def result_of(future: Future[SendResult]) -> SendResult:
    return future.result(timeout=WAIT_S)


@pytest.mark.parametrize("max_associations", [1, 2])
def test_a_destination_runs_at_most_max_associations(
    start_peer: Callable[..., Peer], lanes: SendLanes, studies: list[Path], max_associations: int
) -> None:
    """With 1 the second study waits for the first; with 2 both are open at once."""
    stall = Stall()
    peer = start_peer(on_store=stall)
    destination = peer.destination(timeout=30, max_associations=max_associations)
    first = lanes.submit(destination, studies[:1])
    stall.wait_entered()
    second = lanes.submit(destination, studies[1:2])
    if max_associations == 1:
        assert not second.running() and not second.done()  # queued behind the first
        assert peer.connections == 1
    else:
        stall.wait_entered()  # the second study is stored while the first is still open
        assert peer.connections == 2
    stall.release.set()
    assert [result_of(f).status for f in (first, second)] == [SendStatus.SUCCESS] * 2
    assert stall.most_active == max_associations


def test_a_hung_pacs_holds_neither_other_destinations_nor_other_studies(
    start_peer: Callable[..., Peer], lanes: SendLanes, studies: list[Path]
) -> None:
    """One study hangs on a slow PACS: the next study to it (a free association) and the
    studies to another PACS are all stored meanwhile; stopping then interrupts it at once."""
    hung_uid = dcmread(studies[0], stop_before_pixels=True).SOPInstanceUID
    stall = Stall({str(hung_uid)})
    slow = start_peer(on_store=stall, ae_title="SLOW")
    healthy = start_peer(ae_title="HEALTHY")
    stuck = lanes.submit(slow.destination(timeout=60, max_associations=2), studies[:1])
    stall.wait_entered()
    others = [lanes.submit(slow.destination(timeout=60, max_associations=2), studies[1:2])]
    others += [lanes.submit(healthy.destination(), [p]) for p in studies[2:]]
    results = [result_of(f) for f in others]
    assert [r.status for r in results] == [SendStatus.SUCCESS] * 5, [r.reason for r in results]
    assert not stuck.done(), "the hung send ended before the others were stored"
    assert lanes.cancel_all() == 1
    started = time.monotonic()
    result = result_of(stuck)
    assert time.monotonic() - started < 5.0
    assert result.status is SendStatus.INTERRUPTED
    assert result.reason.startswith(INTERRUPTED_REASON)
    stall.release.set()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
def test_hung_and_trickling_pacs_time_out_while_a_healthy_one_is_served(
    start_peer: Callable[..., Peer],
    start_proxy: Callable[..., TrickleProxy],
    lanes: SendLanes,
    studies: list[Path],
    fast: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """timeout_seconds=3 ends both bad sends (TIMED_OUT) well within 15 s; the healthy PACS
    beside them in the same lanes stores its study while the hung send is still open."""
    monkeypatch.setattr(sender, "FAST_PATH", fast)
    stall = Stall()
    hung = start_peer(on_store=stall, ae_title="HUNG")
    trickler = start_peer(ae_title="TRICKLE")
    proxy = start_proxy(trickler.port, interval=0.5)
    hung_open_at_store: list[bool] = []
    started = time.monotonic()
    bad = [
        lanes.submit(hung.destination(timeout=3), studies[:1]),
        lanes.submit(proxy.destination("TRICKLE", timeout=3), studies[1:2]),
    ]

    def store(event: evt.Event) -> int:
        hung_open_at_store.append(not bad[0].done())
        return 0x0000

    healthy = start_peer(on_store=store, ae_title="HEALTHY")
    stall.wait_entered()
    good = result_of(lanes.submit(healthy.destination(), studies[2:3]))
    results = [result_of(f) for f in bad]
    elapsed = time.monotonic() - started
    stall.release.set()
    assert good.status is SendStatus.SUCCESS, good.reason
    assert hung_open_at_store == [True]
    assert [r.status for r in results] == [SendStatus.TIMED_OUT] * 2, [r.reason for r in results]
    assert all("association exceeded timeout_seconds=3" in r.reason for r in results)
    assert elapsed < BOUND_S
    assert proxy.trickled > 0


def test_cancel_all_interrupts_open_and_queued_sends(
    start_peer: Callable[..., Peer], lanes: SendLanes, studies: list[Path]
) -> None:
    stall = Stall()
    peer = start_peer(on_store=stall)
    destination = peer.destination(timeout=60, max_associations=1)
    futures = [lanes.submit(destination, [p]) for p in studies[:3]]
    stall.wait_entered()
    assert lanes.cancel_all() == 3
    results = [result_of(f) for f in futures]
    stall.release.set()
    assert [r.status for r in results] == [SendStatus.INTERRUPTED] * 3
    assert all(r.reason.startswith(INTERRUPTED_REASON) for r in results)
    assert peer.connections == 1  # the queued ones never connected


def test_a_handle_cancels_one_send_only(
    start_peer: Callable[..., Peer], lanes: SendLanes, studies: list[Path]
) -> None:
    hung_uid = str(dcmread(studies[0], stop_before_pixels=True).SOPInstanceUID)
    stall = Stall({hung_uid})
    peer = start_peer(on_store=stall)
    handle = SendHandle()
    stuck = lanes.submit(peer.destination(timeout=60), studies[:1], handle)
    stall.wait_entered()
    handle.cancel()
    assert result_of(stuck).status is SendStatus.INTERRUPTED
    assert result_of(lanes.submit(peer.destination(), studies[1:2])).status is SendStatus.SUCCESS
    stall.release.set()


def test_lane_identity_and_closed_lanes(lanes: SendLanes, studies: list[Path]) -> None:
    base = PacsConfig(host="pacs", port=104, ae_title="A", calling_ae_title="B")
    assert lane_key(base) == lane_key(dataclasses.replace(base, timeout_seconds=5))
    for change in ({"port": 105}, {"ae_title": "C"}, {"calling_ae_title": "D"}, {"tls_ca": "x"}):
        assert lane_key(base) != lane_key(dataclasses.replace(base, **change))  # type: ignore[arg-type]
    lanes.close()
    with pytest.raises(RuntimeError, match="closed"):
        lanes.submit(base, studies[:1])
