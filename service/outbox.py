"""The outbox: sends queued per destination, opened when their destination has room.

A run's send is recorded ``queued`` together with the run's ``written`` state. The outbox
starts it when its destination has fewer than ``max_associations`` associations open:
``sending`` is committed *before* the association opens (so a crash during it leaves the
send ``interrupted``, never repeated by itself), then the association runs on a thread
of its own. Destinations never wait for each other. When OUTPUT cannot be reached the send
is deferred, not attempted. One attempt per send; the outcome is recorded as a value.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import Config, PacsConfig
from service.fsutil import atomic_write
from service.ledger import (
    IllegalTransition,
    Ledger,
    LedgerUnavailable,
    QueuedSend,
    SendChange,
    Transition,
)
from service.record import describe
from service.sender import ItemResult, SendHandle, SendResult, SendStatus
from service.sendlanes import SendLanes, lane_key
from service.values import RunState, SendState, StudyState

logger = logging.getLogger(__name__)

#: Seconds before a send deferred because OUTPUT was unreachable is looked at again.
DEFER_SECONDS = 5.0
#: ``STATE/<this>``: outcomes of sends that ended while the ledger could not be written,
#: recorded through the ledger at the next start (before ``recover``).
JOURNAL_NAME = "send-journal.json"


@dataclass
class _Open:
    send: QueuedSend
    key: str
    handle: SendHandle
    future: Future[SendResult]


@dataclass
class _Lane:
    queued: deque[QueuedSend] = field(default_factory=deque)
    open: int = 0
    not_before: float = 0.0  # monotonic: deferred until then (OUTPUT unreachable)


class Outbox:
    """Owns every send between ``queued`` and its outcome; all ledger writes happen in the
    thread that calls :meth:`add`, :meth:`pump` and :meth:`cancel_all` (the engine's)."""

    def __init__(self, config: Config, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self._lanes: dict[str, _Lane] = {}
        self._open: list[_Open] = []
        self._send_lanes = SendLanes()  # the associations, each bounded by timeout_seconds
        self._stopping = False  # stopping: no association opens any more
        #: called with (send, result) when a send ends (resend requests wait for it)
        self.on_done: Callable[[QueuedSend, SendState, str], None] | None = None
        #: sends that ended but whose outcome the ledger could not take (it went away)
        self._unrecorded: list[tuple[QueuedSend, SendResult]] = []

    # -- bookkeeping ------------------------------------------------------------------------

    def add(self, send: QueuedSend) -> None:
        """A send recorded ``queued`` in the ledger, to start when its lane has room."""
        destination = self.config.destination(send.gateway_id)
        self._lanes.setdefault(str(lane_key(destination)), _Lane()).queued.append(send)

    def adopt(self, sends: list[QueuedSend]) -> int:
        """Add the queued sends (recorded by any node of a shared ledger) not yet here;
        how many. Each is claimed when it starts: of several nodes, one opens it."""
        known = {s.send_id for lane in self._lanes.values() for s in lane.queued}
        known.update(o.send.send_id for o in self._open)
        new = [send for send in sends if send.send_id not in known]
        for send in new:
            self.add(send)
        return len(new)

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def queued_count(self) -> int:
        return sum(len(lane.queued) for lane in self._lanes.values())

    def busy_studies(self) -> set[tuple[str, str]]:
        """Studies with a send queued or open: not looked at again until it ends."""
        busy = {(o.send.gateway_id, o.send.study_uid) for o in self._open}
        for lane in self._lanes.values():
            busy.update((s.gateway_id, s.study_uid) for s in lane.queued)
        return busy

    def futures(self) -> list[Future[SendResult]]:
        return [o.future for o in self._open]

    # -- the work -----------------------------------------------------------------------------

    def pump(self) -> int:
        """Record the sends that ended, start the queued ones that have room; how many
        ended."""
        ended = [o for o in self._open if o.future.done()]
        self._open = [o for o in self._open if not o.future.done()]
        for number, item in enumerate(ended):
            self._lanes[item.key].open -= 1
            result = _result_of(item.future)
            try:
                self._record(item.send, result)
            except LedgerUnavailable:  # kept for the journal (see :meth:`journal`)
                self._unrecorded.append((item.send, result))
                for rest in ended[number + 1 :]:
                    self._lanes[rest.key].open -= 1
                    self._unrecorded.append((rest.send, _result_of(rest.future)))
                raise
            except Exception:  # a bug: logged, the other sends go on
                logger.exception("send %d: recording its outcome failed", item.send.send_id)
        now = time.monotonic()
        for key, lane in self._lanes.items():
            while lane.queued and lane.not_before <= now and not self._stopping:
                destination = self.config.destination(lane.queued[0].gateway_id)
                if lane.open >= destination.max_associations:
                    break
                try:
                    started = self._start(key, lane, destination)
                except LedgerUnavailable:
                    raise
                except Exception:  # a bug: this send is left queued in the ledger
                    logger.exception("a send to %s could not start", key)
                    continue
                if not started:
                    lane.not_before = now + DEFER_SECONDS
                    break
        return len(ended)

    def _start(self, key: str, lane: _Lane, destination: PacsConfig) -> bool:
        send = lane.queued.popleft()
        if not destination.enabled:
            reason = "no destination configured for this gateway any more"
            self.ledger.apply(
                Transition(
                    send.gateway_id,
                    send.study_uid,
                    send=SendChange(SendState.ERROR, send.send_id, reason=reason),
                    events=[("WARNING", f"send {send.send_id} dropped: {reason}")],
                )
            )
            self._finished(send, SendState.ERROR, reason)
            return True
        paths = [Path(row["path"]) for row in self.ledger.outputs(send.run_id)]
        unreachable = _unreachable(self.config.output_dir)
        if unreachable:
            gid, suid = send.gateway_id, send.study_uid
            logger.warning("gateway=%s study=%s send deferred: %s", gid, suid, unreachable)
            lane.queued.appendleft(send)
            return False
        where = describe(destination)
        starting = Transition(
            send.gateway_id,
            send.study_uid,
            StudyState.SENDING,
            where,
            run_id=send.run_id,
            run=RunState.SENDING,
            run_reason="",
            send=SendChange(SendState.SENDING, send.send_id),
        )
        if self.config.ledger:  # shared by nodes: opened only by the node that claims it
            if not self.ledger.claim_queued_sends(1, lambda _s: starting, (send.send_id,)):
                logger.debug("send %d: started by another node", send.send_id)
                return True
        else:
            self.ledger.apply(starting)
        handle = SendHandle()
        future = self._send_lanes.submit(destination, paths, handle)
        self._open.append(_Open(send, key, handle, future))
        lane.open += 1
        return True

    def _record(self, send: QueuedSend, result: SendResult) -> None:
        state = SendState(result.status.value)
        reason = _reason(result)
        outcome = outcome_transition(send, result)
        try:
            self.ledger.apply(outcome)
        except IllegalTransition:
            if not self.config.ledger:
                raise
            # this node looked gone (its heartbeat went old) and another node recorded
            # this send interrupted meanwhile: the real outcome replaces it
            self.ledger.apply_late_send(outcome)
        self._finished(send, state, reason)

    def _finished(self, send: QueuedSend, state: SendState, reason: str) -> None:
        if self.on_done is not None:
            self.on_done(send, state, reason)

    def stop_opening(self) -> None:
        """Open no more associations (the service is stopping); queued sends stay queued."""
        self._stopping = True

    def cancel_all(self, timeout: float) -> None:
        """Abort every open association and record it (``interrupted``); queued sends stay
        queued in the ledger and start at the next start."""
        self.stop_opening()
        for item in self._open:
            item.handle.cancel()
        self._await_open(timeout)
        self.pump()

    def _await_open(self, timeout: float) -> None:
        """Wait, ``timeout`` in all, for the open associations to end."""
        deadline = time.monotonic() + timeout
        for item in self._open:
            try:
                item.future.result(max(0.0, deadline - time.monotonic()))
            except Exception:
                logger.debug("send thread did not end in time", exc_info=True)

    def journal(self, state_dir: Path, timeout: float) -> int:
        """The ledger cannot be written (the service exits): let the open associations run
        to their end (within ``timeout``; those still open then are aborted), and write the
        outcome of every send not recorded to ``STATE/send-journal.json`` (atomically,
        added to what it holds), so that the next start records them (:func:`replay`)
        instead of recording the sends ``interrupted``. How many outcomes it holds."""
        self.stop_opening()
        self._await_open(timeout)
        for item in self._open:
            if not item.future.done():
                item.handle.cancel()  # still open at the deadline: aborted
        for item in self._open:
            try:
                item.future.result(5.0)
            except Exception:
                logger.debug("send thread did not end in time", exc_info=True)
            if item.future.done():
                self._unrecorded.append((item.send, _result_of(item.future)))
        self._open = [o for o in self._open if not o.future.done()]
        entries = _read_journal(state_dir) + [
            _journal_entry(send, result) for send, result in self._unrecorded
        ]
        self._unrecorded = []
        if entries:
            payload = json.dumps(entries, indent=1).encode()
            atomic_write(state_dir / JOURNAL_NAME, lambda fh: fh.write(payload))
            logger.warning(
                "the ledger cannot be written: %d send outcome(s) kept in %s for the next start",
                len(entries),
                state_dir / JOURNAL_NAME,
            )
        return len(entries)

    def close(self) -> None:
        self._send_lanes.cancel_all()
        self._send_lanes.close(wait=False)


def outcome_transition(send: QueuedSend, result: SendResult) -> Transition:
    """The transition that records how ``send`` ended."""
    ok = result.ok
    reason = _reason(result)
    return Transition(
        send.gateway_id,
        send.study_uid,
        StudyState.SENT if ok else StudyState.SEND_FAILED,
        reason,
        run_id=send.run_id,
        run=RunState.SENT if ok else RunState.SEND_FAILED,
        run_reason="" if ok else reason,
        send=SendChange(
            SendState(result.status.value),
            send.send_id,
            reason=result.reason,
            items=[(i.sop_instance_uid, str(i.status), i.status_code) for i in result.items],
        ),
        events=[] if ok else [("ERROR", f"send {send.send_id}: {reason}")],
    )


def _reason(result: SendResult) -> str:
    return f"{result.status}: {result.reason}" if result.reason else str(result.status)


def _journal_entry(send: QueuedSend, result: SendResult) -> dict[str, Any]:
    return {
        "send_id": send.send_id,
        "run_id": send.run_id,
        "gateway_id": send.gateway_id,
        "study_uid": send.study_uid,
        "manual": send.manual,
        "status": result.status.value,
        "reason": result.reason,
        "items": [
            [i.sop_instance_uid, i.status.value, i.status_code, str(i.path)] for i in result.items
        ],
    }


def _read_journal(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / JOURNAL_NAME
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{path} is not a list of send outcomes")
    return entries


def replay(ledger: Ledger, state_dir: Path) -> int:
    """At start, before ``recover``: record the outcomes kept in ``STATE/send-journal.json``
    through the ledger: a send still ``sending`` gets its outcome; one another node recorded
    ``interrupted`` meanwhile gets it as a late outcome (:meth:`Ledger.apply_late_send`);
    one already recorded otherwise is left as it is. The journal is removed once all are
    recorded (a ledger still unreachable raises :class:`LedgerUnavailable`, keeping it).
    How many were recorded."""
    path = state_dir / JOURNAL_NAME
    recorded = 0
    for entry in _read_journal(state_dir):
        send = QueuedSend(
            int(entry["send_id"]),
            int(entry["run_id"]),
            str(entry["gateway_id"]),
            str(entry["study_uid"]),
            bool(entry["manual"]),
        )
        items = entry["items"]
        result = SendResult(
            SendStatus(entry["status"]),
            str(entry["reason"]),
            [ItemResult(uid, SendStatus(status), code, Path(p)) for uid, status, code, p in items],
        )
        outcome = outcome_transition(send, result)
        rows = ledger.query("SELECT state FROM sends WHERE send_id=?", (send.send_id,))
        current = rows[0]["state"] if rows else None
        if current == SendState.SENDING:
            ledger.apply(outcome)
        elif current == SendState.INTERRUPTED:
            ledger.apply_late_send(outcome)
        else:
            logger.info(
                "send %d: already recorded %s; its journal entry dropped", send.send_id, current
            )
            continue
        recorded += 1
        logger.warning(
            "gateway=%s study=%s send %d: outcome %s recorded from the journal (it ended while"
            " the ledger could not be written)",
            send.gateway_id,
            send.study_uid,
            send.send_id,
            result.status,
        )
    path.unlink(missing_ok=True)
    return recorded


def _result_of(future: Future[SendResult]) -> SendResult:
    if future.cancelled():
        return SendResult(SendStatus.ERROR, "send cancelled before it started")
    exc = future.exception()
    if exc is not None:  # the sender reports outcomes as values; this is a bug
        logger.error("send failed unexpectedly", exc_info=exc)
        return SendResult(SendStatus.ERROR, f"unexpected error: {type(exc).__name__}: {exc}")
    return future.result()


def _unreachable(output_dir: Path) -> str:
    """Why OUTPUT cannot be read now ('' when it can): a send then waits."""
    try:
        os.listdir(output_dir)
    except OSError as exc:
        return f"OUTPUT {output_dir} is not reachable ({exc.strerror or exc})"
    return ""
