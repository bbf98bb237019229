"""The ledger: the one owner of the service's state, an SQLite database in ``STATE/`` or,
for several nodes, a PostgreSQL database (``[service] ledger``; see :mod:`service.ledgerdb`).

Tables: gateways, studies, instances, runs, outputs, sends, send_items, events,
finished_listings; nodes and leases (the building blocks of several nodes on one ledger:
heartbeats, leases taken on the database's clock, runs and sends claimed exactly once);
schema_version. Every change is one :class:`Transition` applied by :meth:`Ledger.apply`:
the study, its run, its send, their outputs and events change together in one transaction,
and a change not in the tables of :mod:`service.values` is refused
(:class:`IllegalTransition`). Nothing else writes the database. A transition with a
``fence`` (a run's outcome on a ledger shared by nodes) applies only while the node still
holds the run's lease and the run is still ``running``, checked in the same transaction.

A run is unique per (gateway, study, inputs digest, model name, model version, generation):
repeated events or restarts never run the same inputs twice; ``reprocess`` bumps generation.
When the database cannot be written (disk full, read-only, I/O error, a lost PostgreSQL
connection) the ledger raises :class:`LedgerUnavailable`: the service cannot go on and exits
non-zero. (A lost PostgreSQL connection is opened again by the next call.) The tables are
created and brought up to date by numbered migrations (:data:`MIGRATIONS`, the
``schema_version`` table) when the ledger is opened for writing. :meth:`Ledger.import_sqlite`
copies a stopped service's SQLite ledger into an empty PostgreSQL one (``ledger import``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from service import failpoints
from service.config import mask_url
from service.errors import GatewayError
from service.ledgerdb import DRIVER_ERRORS, Database, Row, is_url, open_database
from service.values import (
    FINAL_RUN_STATES,
    RUN_TRANSITIONS,
    SEND_TRANSITIONS,
    SENT_OK,
    STUDY_TRANSITIONS,
    RunState,
    SendState,
    StudyState,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The lease a node holds while it executes a run (a ledger shared by nodes).
RUN_LEASE = "run:{}"

__all__ = [
    "FINAL_RUN_STATES",
    "Applied",
    "IllegalTransition",
    "ImportRefused",
    "InstanceRecord",
    "Ledger",
    "LedgerUnavailable",
    "NewRun",
    "OutputRecord",
    "Row",
    "RunRow",
    "RunState",
    "SendChange",
    "SendState",
    "StudyState",
    "Transition",
    "printable",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateways (
    gateway_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    gateway_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (gateway_id, study_uid)
);
CREATE TABLE IF NOT EXISTS instances (
    gateway_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,              -- ok | rejected
    reason TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (gateway_id, path)
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (gateway_id, study_uid);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    inputs_digest TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    previous_run_id INTEGER,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    n_inputs INTEGER NOT NULL DEFAULT 0,
    started REAL NOT NULL,
    finished REAL,
    timings TEXT NOT NULL DEFAULT '{}',
    findings TEXT NOT NULL DEFAULT '{}',
    node TEXT NOT NULL DEFAULT '',
    UNIQUE (gateway_id, study_uid, inputs_digest, model_name, model_version, generation)
);
CREATE TABLE IF NOT EXISTS outputs (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    PRIMARY KEY (run_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS sends (
    send_id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,             -- a SendState value
    reason TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL,
    manual INTEGER NOT NULL DEFAULT 0,
    opened REAL                      -- when the association was about to open
);
CREATE TABLE IF NOT EXISTS send_items (
    send_id INTEGER NOT NULL REFERENCES sends(send_id),
    sop_instance_uid TEXT NOT NULL,
    status TEXT NOT NULL,
    status_code INTEGER,
    PRIMARY KEY (send_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS finished_listings (  -- a study folder's listing when it finished
    gateway_id TEXT NOT NULL,
    folder TEXT NOT NULL,
    listing BLOB NOT NULL,            -- digest of (path, size, mtime) of every file
    PRIMARY KEY (gateway_id, folder)
);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    gateway_id TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


class LedgerUnavailable(GatewayError):
    """The ledger cannot be read or written: the service cannot go on."""


class IllegalTransition(GatewayError):
    """A state change that is not in the tables of :mod:`service.values` (a bug)."""


class ImportRefused(GatewayError):
    """:meth:`Ledger.import_sqlite` will not copy: the reason, for the operator."""


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (undecodable file names) escaped, for the
    ledger and the log: the name's undecodable bytes as ``\\xff``, as
    ``os.fsencode(name).decode("utf-8", "backslashreplace")`` shows them."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class InstanceRecord:
    """One file of a study as recorded: a used instance, or rejected with the reason."""

    path: str
    size: int
    mtime_ns: int
    sha256: str = ""
    sop_instance_uid: str = ""
    series_uid: str = ""
    sop_class_uid: str = ""
    rejected_reason: str = ""


@dataclass(frozen=True)
class OutputRecord:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str


@dataclass(frozen=True)
class NewRun:
    """A run to create (state ``running``, or ``skipped`` when no model applies)."""

    model_name: str
    model_version: str
    inputs_digest: str
    n_inputs: int
    generation: int = 0
    node: str = ""


@dataclass(frozen=True)
class SendChange:
    """A new send (``send_id`` None: created ``queued`` for ``destination``) or a change of
    an existing one, with its per-instance (SOP UID, status, status code) results."""

    state: SendState
    send_id: int | None = None
    destination: str = ""
    manual: bool = False
    reason: str = ""
    items: Sequence[tuple[str, str, int | None]] = ()


@dataclass(frozen=True)
class Transition:
    """One change of a study: its state, its run's, its send's, plus what they produced.

    ``study``/``run``/``send`` None leave that part as it is. ``run_id`` names the run
    changed (or the run a new send belongs to); ``new_run`` creates one instead. Runs of
    the study left ``running`` by an earlier stop are closed as superseded when a new run
    starts. ``listing`` stores the study folder's listing digest (it is finished with this
    listing); ``forget_listing`` drops it (the study must be looked at again).
    """

    gateway_id: str
    study_uid: str
    study: StudyState | None = None
    reason: str = ""
    run_id: int | None = None
    new_run: NewRun | None = None
    run: RunState | None = None
    run_reason: str | None = None  # None: the study's reason
    timings: dict[str, float] | None = None
    findings: dict[str, Any] | None = None
    outputs: Sequence[OutputRecord] = ()
    send: SendChange | None = None
    instances: Sequence[InstanceRecord] = ()
    events: Sequence[tuple[str, str]] = ()  # (level, message)
    listing: bytes | None = None
    forget_listing: bool = False
    #: fencing (a ledger shared by nodes): the name of the lease this node (the ledger's
    #: ``node``) must still hold, with run ``run_id`` still ``running``, for the transition
    #: to apply; checked in its own transaction, and the lease is released with it. When
    #: the check fails nothing of it applies but a WARNING event (``Applied.discarded``).
    fence: str = ""
    #: with ``fence``: keep the lease (not released with the transition)
    keep_lease: bool = False


@dataclass(frozen=True)
class Applied:
    """What :meth:`Ledger.apply` created."""

    run_id: int | None = None
    send_id: int | None = None
    study_changed: bool = False
    #: the transition was fenced off (:attr:`Transition.fence`): only its event recorded
    discarded: str = ""


@dataclass(frozen=True)
class RunRow:
    run_id: int
    gateway_id: str
    study_uid: str
    model_name: str
    model_version: str
    inputs_digest: str
    generation: int
    state: RunState
    reason: str
    findings: dict[str, Any]
    node: str = ""


class Ledger:
    """Thread-safe access to the ledger database (one connection, serialised).

    ``location``: the SQLite file (a path) or a ``postgresql://`` URL; ``node``: the
    service's ``node_name``, recorded with every send it opens (``sends.node``)."""

    #: how many times a write transaction runs again after a serialisation failure
    #: (PostgreSQL, two nodes changing the same rows at once) before giving up
    RETRIES = 20

    def __init__(self, location: Path | str, node: str = "") -> None:
        self.path: Path | str = location if is_url(location) else Path(location)
        self.node = node
        self._lock = threading.RLock()
        #: called after each committed transition (e.g. failure notifications); an
        #: observer must not block and must not apply transitions itself on this thread
        self.observers: list[Callable[[Transition, Applied], None]] = []
        try:
            self._db: Database = open_database(self.path)
            _migrate(self._db)
        except OSError as exc:
            raise self._unavailable(exc) from exc
        except Exception as exc:
            if isinstance(exc, DRIVER_ERRORS):
                raise self._unavailable(exc) from exc
            raise

    @property
    def description(self) -> str:
        """The ledger's file, or its URL with the password masked."""
        return mask_url(str(self.path)) if is_url(self.path) else str(self.path)

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable:
        if is_url(self.path):
            return LedgerUnavailable(
                f"the ledger {self.description} cannot be reached or written ({exc}); check"
                " that PostgreSQL is up and reachable from here and the database writable"
            )
        return LedgerUnavailable(
            f"the ledger {self.path} cannot be written ({exc}); check that its disk has space "
            "and that the folder is writable by the service, then restart it"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, work: Callable[[Database], T]) -> T:
        """``work`` in one write transaction, committed, or rolled back whole when it
        raises; run again (up to :attr:`RETRIES` times) when the database refused it for a
        concurrent change (PostgreSQL SERIALIZABLE), after a random pause, so that it
        then sees that change."""
        with self._lock:
            db = self._db
            for attempt in range(self.RETRIES + 1):
                try:
                    with _transaction(db):
                        return work(db)
                except db.errors as exc:
                    if db.retryable(exc) and attempt < self.RETRIES:
                        logger.debug("ledger: concurrent change, transaction runs again")
                        # a random pause, growing with the attempts, so that nodes that
                        # conflicted do not meet again in lockstep
                        time.sleep(random.uniform(0.0, min(0.25, 0.002 * 2**attempt)))
                        continue
                    raise self._unavailable(exc) from exc
            raise AssertionError("unreachable")

    def _clock(self) -> float:
        """The database's clock now (epoch seconds), outside a transaction."""
        with self._lock:
            try:
                return self._db.clock()
            except self._db.operational as exc:
                raise self._unavailable(exc) from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            try:
                return list(self._db.execute(sql, params))
            except self._db.operational as exc:
                raise self._unavailable(exc) from exc

    # -- the one way to change state ------------------------------------------------------

    def apply(self, t: Transition) -> Applied:
        """Apply ``t`` in one transaction, or refuse it whole (:class:`IllegalTransition`)."""
        label = _label(t)
        now = time.time()

        def work(db: Database) -> Applied:
            why = self._fenced_off(db, t) if t.fence else ""
            if why:
                event = f"run {t.run_id}: outcome discarded: {why}"
                self._apply_in(
                    db, Transition(t.gateway_id, t.study_uid, events=[("WARNING", event)]), now
                )
                if t.fence:
                    db.execute("DELETE FROM leases WHERE name=? AND node=?", (t.fence, self.node))
                return Applied(run_id=t.run_id, discarded=why)
            applied = self._apply_in(db, t, now)
            if t.fence and not t.keep_lease:
                db.execute("DELETE FROM leases WHERE name=? AND node=?", (t.fence, self.node))
            failpoints.hit(f"before-commit:{label}")
            return applied

        applied = self._write(work)
        if applied.discarded:
            logger.warning(
                "gateway=%s study=%s run %s: outcome discarded: %s",
                printable(t.gateway_id),
                printable(t.study_uid),
                t.run_id,
                applied.discarded,
            )
            return applied
        failpoints.hit(f"after-commit:{label}")
        self._published(t, applied)
        return applied

    def _published(self, t: Transition, applied: Applied) -> None:
        """A committed change logged and passed to the observers (an observer never undoes
        or stops a committed change: its failure is logged)."""
        _log_change(t, applied)
        for observer in self.observers:
            try:
                observer(t, applied)
            except Exception:
                logger.exception("ledger observer %r failed", observer)

    def _fenced_off(self, db: Database, t: Transition) -> str:
        """Why ``t`` must not apply under its fence ("" when it may): the lease
        ``t.fence`` is held by another node (or by none), or run ``t.run_id`` is no longer
        ``running`` (another node recorded its outcome). A lease this node still holds
        counts even when it ran out: no other node has taken it over, and a node taking
        it over now conflicts with this transaction (SERIALIZABLE; one of them runs
        again and sees the other's change)."""
        row = db.execute("SELECT node FROM leases WHERE name=?", (t.fence,)).fetchone()
        if row is None or row[0] != self.node:
            holder = f"node {row[0]}" if row is not None else "no node"
            return f"lease {t.fence} is held by {holder}, not by {self.node}"
        run = db.execute("SELECT state FROM runs WHERE run_id=?", (t.run_id,)).fetchone()
        if run is None or run[0] != RunState.RUNNING:
            state = run[0] if run is not None else "missing"
            return f"run {t.run_id} is {state}, no longer running"
        return ""

    def _apply_in(self, db: Database, t: Transition, now: float, *, late: bool = False) -> Applied:
        gid, suid = printable(t.gateway_id), printable(t.study_uid)
        run_id, changed = t.run_id, False
        if t.study is not None:
            changed = self._set_study(db, gid, suid, t.study, printable(t.reason), now)
        if t.new_run is not None:
            run_id = self._new_run(db, gid, suid, t, now)
        elif t.run is not None:
            self._set_run(db, t, now)
        send_id = self._send(db, t, run_id, now, late) if t.send is not None else None
        db.executemany(
            "INSERT INTO outputs VALUES (?,?,?,?,?) ON CONFLICT (run_id, sop_instance_uid)"
            " DO UPDATE SET path=excluded.path, sop_class_uid=excluded.sop_class_uid,"
            " series_uid=excluded.series_uid",
            [
                (run_id, str(o.path), o.sop_class_uid, o.sop_instance_uid, o.series_uid)
                for o in t.outputs
            ],
        )
        self._record_instances(db, gid, suid, t.instances, now)
        db.executemany(
            "INSERT INTO events (ts, gateway_id, study_uid, level, message) VALUES (?, ?, ?, ?, ?)",
            [(now, gid, suid, level, printable(msg)) for level, msg in t.events],
        )
        if t.listing is not None:
            db.execute(
                "INSERT INTO finished_listings (gateway_id, folder, listing) VALUES (?, ?, ?)"
                " ON CONFLICT (gateway_id, folder) DO UPDATE SET listing=excluded.listing",
                (gid, suid, t.listing),
            )
        elif t.forget_listing:
            db.execute("DELETE FROM finished_listings WHERE gateway_id=? AND folder=?", (gid, suid))
        return Applied(run_id, send_id, changed)

    def _set_study(
        self,
        db: Database,
        gid: str,
        suid: str,
        state: StudyState,
        reason: str,
        now: float,
    ) -> bool:
        row = db.execute(
            "SELECT state, reason FROM studies WHERE gateway_id=? AND study_uid=?", (gid, suid)
        ).fetchone()
        old = StudyState(row["state"]) if row is not None else None
        if old == state and row["reason"] == reason:
            return False
        if old != state and state not in STUDY_TRANSITIONS[old]:
            raise IllegalTransition(f"study {suid}: {old} -> {state} is not a legal change")
        db.execute(
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT"
            " (gateway_id, study_uid) DO UPDATE SET state=excluded.state,"
            " reason=excluded.reason, updated=excluded.updated",
            (gid, suid, str(state), reason, now, now),
        )
        return True

    def _new_run(self, db: Database, gid: str, suid: str, t: Transition, now: float) -> int:
        new = t.new_run
        assert new is not None
        state = t.run or RunState.RUNNING
        if state not in RUN_TRANSITIONS[None]:
            raise IllegalTransition(f"a new run cannot start {state}")
        prev = db.execute(
            "SELECT MAX(run_id) FROM runs WHERE gateway_id=? AND study_uid=?", (gid, suid)
        ).fetchone()[0]
        run_id: int = db.execute(
            "INSERT INTO runs (gateway_id, study_uid, model_name, model_version,"
            " inputs_digest, generation, previous_run_id, state, reason, n_inputs, started,"
            " finished, node) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING run_id",
            (
                gid,
                suid,
                new.model_name,
                new.model_version,
                new.inputs_digest,
                new.generation,
                prev,
                str(state),
                printable(t.reason if t.run_reason is None else t.run_reason),
                new.n_inputs,
                now,
                now if state in FINAL_RUN_STATES else None,
                new.node,
            ),
        ).fetchone()[0]
        # a run left running by a stop, on inputs that have changed since, is over
        db.execute(
            "UPDATE runs SET state=?, reason=?, finished=? WHERE gateway_id=? AND study_uid=?"
            " AND state=? AND run_id<>?",
            (
                str(RunState.FAILED),
                f"superseded by run {run_id}",
                now,
                gid,
                suid,
                str(RunState.RUNNING),
                run_id,
            ),
        )
        return run_id

    def _set_run(self, db: Database, t: Transition, now: float) -> None:
        row = db.execute("SELECT state FROM runs WHERE run_id=?", (t.run_id,)).fetchone()
        if row is None:
            raise IllegalTransition(f"run {t.run_id} does not exist")
        old, state = RunState(row["state"]), t.run
        assert state is not None
        if old != state and state not in RUN_TRANSITIONS[old]:
            raise IllegalTransition(f"run {t.run_id}: {old} -> {state} is not a legal change")
        sets = ["state=?", "reason=?"]
        reason = t.reason if t.run_reason is None else t.run_reason
        params: list[Any] = [str(state), printable(reason)]
        if state in FINAL_RUN_STATES or state == RunState.WRITTEN:
            sets.append("finished=?")
            params.append(now)
        if t.timings is not None:
            sets.append("timings=?")
            params.append(json.dumps(t.timings, sort_keys=True))
        if t.findings is not None:
            sets.append("findings=?")
            params.append(json.dumps(t.findings, sort_keys=True))
        db.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id=?", [*params, t.run_id])

    def _send(
        self, db: Database, t: Transition, run_id: int | None, now: float, late: bool = False
    ) -> int:
        """Create or change ``t``'s send; ``late``: an ``interrupted`` send's real outcome
        (:meth:`apply_late_send` only)."""
        change = t.send
        assert change is not None
        if change.send_id is None:
            if change.state not in SEND_TRANSITIONS[None] or run_id is None:
                raise IllegalTransition(f"a new send cannot start {change.state}")
            send_id: int = db.execute(
                "INSERT INTO sends (run_id, destination, state, reason, started, manual)"
                " VALUES (?,?,?,?,?,?) RETURNING send_id",
                (run_id, change.destination, str(change.state), "", now, int(change.manual)),
            ).fetchone()[0]
            return send_id
        row = db.execute(
            "SELECT state, node FROM sends WHERE send_id=?", (change.send_id,)
        ).fetchone()
        old = SendState(row["state"]) if row is not None else None
        if old is None or change.state not in SEND_TRANSITIONS[old]:
            raise IllegalTransition(f"send {change.send_id}: {old} -> {change.state}")
        if old == SendState.INTERRUPTED and (not late or not self.node or row["node"] != self.node):
            raise IllegalTransition(
                f"send {change.send_id}: interrupted -> {change.state} only as the late"
                f" outcome recorded by the node that opened it ({row['node'] or 'unknown'})"
            )
        column = "opened=?, node" if change.state == SendState.SENDING else "finished"
        opener = (self.node,) if change.state == SendState.SENDING else ()
        db.execute(
            f"UPDATE sends SET state=?, reason=?, {column}=? WHERE send_id=?",
            (str(change.state), printable(change.reason), now, *opener, change.send_id),
        )
        db.executemany(
            "INSERT INTO send_items VALUES (?,?,?,?) ON CONFLICT (send_id, sop_instance_uid)"
            " DO UPDATE SET status=excluded.status, status_code=excluded.status_code",
            [(change.send_id, uid, status, code) for uid, status, code in change.items],
        )
        return change.send_id

    @staticmethod
    def _record_instances(
        db: Database,
        gid: str,
        suid: str,
        records: Sequence[InstanceRecord],
        now: float,
    ) -> None:
        db.executemany(
            "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT"
            " (gateway_id, path) DO UPDATE SET study_uid=excluded.study_uid,"
            " size=excluded.size, mtime_ns=excluded.mtime_ns, sha256=excluded.sha256,"
            " sop_instance_uid=excluded.sop_instance_uid, series_uid=excluded.series_uid,"
            " sop_class_uid=excluded.sop_class_uid, state=excluded.state,"
            " reason=excluded.reason, updated=excluded.updated",
            [
                (
                    gid,
                    suid,
                    printable(r.path),
                    r.size,
                    r.mtime_ns,
                    r.sha256,
                    r.sop_instance_uid,
                    r.series_uid,
                    r.sop_class_uid,
                    "rejected" if r.rejected_reason else "ok",
                    printable(r.rejected_reason),
                    now,
                )
                for r in records
            ],
        )

    def add_gateway(self, gateway_id: str, path: Path) -> bool:
        """Record a gateway; True when it was new."""
        now = time.time()
        return self._write(
            lambda db: (
                db.execute(
                    "INSERT INTO gateways VALUES (?, ?, ?) ON CONFLICT (gateway_id) DO NOTHING",
                    (gateway_id, printable(str(path)), now),
                ).rowcount
                > 0
            )
        )

    def recover(self) -> Recovery:
        """After a restart, in one transaction: every send left open is ``interrupted``
        (its run and study ``send_failed``: never repeated without being asked), and the
        studies with a run left ``running`` lose their finished listing so that the next
        look resumes the run. Returns the sends still queued (never opened: they go now).

        On a PostgreSQL ledger shared by nodes, a ledger opened with a ``node`` recovers its
        own: the sends it opened and the queued sends of the runs it ran (and those recorded
        without a node); the others' stay theirs."""
        now = time.time()
        reason = "send interrupted by a stop; use `resend` to try again"
        shared = is_url(self.path) and bool(self.node)
        scope = (self.node,) if shared else ()

        def mine(alias: str) -> str:
            return f" AND {alias}.node IN (?, '')" if shared else ""

        def work(db: Database) -> tuple[list[Row], list[QueuedSend]]:
            open_sends = list(
                db.execute(
                    "SELECT s.send_id, s.run_id, r.gateway_id, r.study_uid, st.state"
                    " FROM sends s JOIN runs r USING (run_id) LEFT JOIN studies st"
                    " ON st.gateway_id = r.gateway_id AND st.study_uid = r.study_uid"
                    " WHERE s.state=?" + mine("s"),
                    (str(SendState.SENDING), *scope),
                )
            )
            for send_id, run_id, gid, suid, study_state in open_sends:
                t = _interrupted(
                    (gid, suid, run_id, send_id),
                    study_state,
                    reason,
                    "service stopped during send",
                    f"send {send_id} interrupted by a stop",
                )
                self._apply_in(db, t, now)
            db.execute(
                "DELETE FROM finished_listings WHERE (gateway_id, folder) IN"
                " (SELECT gateway_id, study_uid FROM runs WHERE state = ?)",
                (str(RunState.RUNNING),),
            )
            queued = [
                _queued_send(r)
                for r in db.execute(
                    _QUEUED_SENDS + mine("r") + " ORDER BY s.send_id",
                    (str(SendState.QUEUED), *scope),
                )
            ]
            return open_sends, queued

        open_sends, queued = self._write(work)
        for row in open_sends:
            logger.warning(
                "gateway=%s study=%s send %d interrupted by a stop; not repeated by itself",
                row[2],
                row[3],
                row[0],
            )
        return Recovery(interrupted=len(open_sends), queued=queued)

    def claim_queued_sends(
        self,
        limit: int,
        start: Callable[[QueuedSend], Transition],
        send_ids: Sequence[int] = (),
    ) -> list[QueuedSend]:
        """Claim up to ``limit`` queued sends, oldest first, each changed by ``start(send)``
        (its ``queued`` -> ``sending`` transition, committed before the association opens),
        all in one transaction: of several nodes claiming at once, exactly one gets each
        send. PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED`` passes over the sends another
        node is claiming; SQLite: the one writer claims them all in turn. ``send_ids``:
        only among these."""
        only = f" AND s.send_id IN ({','.join('?' * len(send_ids))})" if send_ids else ""

        def work(db: Database) -> list[tuple[QueuedSend, Transition, Applied]]:
            rows = db.execute(
                _QUEUED_SENDS + only + " ORDER BY s.send_id LIMIT ?" + db.skip_locked("s"),
                (str(SendState.QUEUED), *send_ids, limit),
            ).fetchall()
            claimed = []
            now = time.time()
            for row in rows:
                send = _queued_send(row)
                t = start(send)
                if t.send is None or (t.send.send_id, t.send.state) != (
                    send.send_id,
                    SendState.SENDING,
                ):
                    raise IllegalTransition(f"a claim of send {send.send_id} must start it")
                claimed.append((send, t, self._apply_in(db, t, now)))
                failpoints.hit(f"before-commit:{_label(t)}")
            return claimed

        claimed = self._write(work)
        for _, t, applied in claimed:
            failpoints.hit(f"after-commit:{_label(t)}")
            self._published(t, applied)
        return [send for send, _, _ in claimed]

    def apply_late_send(self, t: Transition) -> Applied:
        """Record the real outcome of a send this node opened that another node recorded
        ``interrupted`` meanwhile (this node looked gone): the send ``interrupted`` → its
        outcome; its run and study ``send_failed`` → ``sent`` / ``send_failed`` only when
        nothing newer happened to them (the send is its run's latest, the run its study's
        latest and still ``send_failed``), else the run's and study's states stay; with an
        event. One transaction; :class:`IllegalTransition` when the send is not such a
        send."""
        change = t.send
        assert change is not None and change.send_id is not None
        send_id = change.send_id
        now = time.time()
        event = f"send {send_id} ended after it was recorded interrupted: {change.state}"

        def work(db: Database) -> tuple[Transition, Applied]:
            row = db.execute(
                "SELECT s.state, s.run_id, r.state, r.gateway_id, r.study_uid, st.state,"
                " (SELECT MAX(s2.send_id) FROM sends s2 WHERE s2.run_id = s.run_id),"
                " (SELECT MAX(r2.run_id) FROM runs r2 WHERE r2.gateway_id = r.gateway_id"
                "  AND r2.study_uid = r.study_uid)"
                " FROM sends s JOIN runs r USING (run_id) LEFT JOIN studies st"
                " ON st.gateway_id = r.gateway_id AND st.study_uid = r.study_uid"
                " WHERE s.send_id=?",
                (send_id,),
            ).fetchone()
            if row is None or row[0] != SendState.INTERRUPTED:
                raise IllegalTransition(f"send {send_id} is not interrupted")
            _, run_id, run_state, _, _, study_state, last_send, last_run = row
            run_current = run_state == RunState.SEND_FAILED and last_send == send_id
            study_current = (
                run_current and study_state == StudyState.SEND_FAILED and last_run == run_id
            )
            late = replace(
                t,
                study=t.study if study_current else None,
                run=t.run if run_current else None,
                run_reason=t.run_reason if run_current else None,
                events=[*t.events, ("WARNING", event + " (recorded now)")],
            )
            return late, self._apply_in(db, late, now, late=True)

        late, applied = self._write(work)
        logger.warning(
            "gateway=%s study=%s %s: its real outcome recorded",
            printable(t.gateway_id),
            printable(t.study_uid),
            event,
        )
        self._published(late, applied)
        return applied

    # -- nodes and leases (the building blocks of several nodes on one ledger) -------------

    def heartbeat(self, node: str, roles: Sequence[str] = ()) -> float:
        """Record that ``node`` (with ``roles``) is alive now; the database's time."""

        def work(db: Database) -> float:
            now = db.clock()
            db.execute(
                "INSERT INTO nodes (node, roles, started, heartbeat) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (node) DO UPDATE SET roles=excluded.roles,"
                " heartbeat=excluded.heartbeat",
                (node, ",".join(roles), now, now),
            )
            return now

        return self._write(work)

    def take_lease(self, name: str, node: str, seconds: float) -> bool:
        """Take or renew the lease ``name`` for ``node`` until ``seconds`` from now (the
        database's clock): True when ``node`` holds it now, False while another node's
        lease has not expired. One statement decides, so two nodes never both get it."""

        def work(db: Database) -> bool:
            now = db.clock()
            row = db.execute(
                "INSERT INTO leases (name, node, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET node=excluded.node, expires=excluded.expires"
                " WHERE leases.node=excluded.node OR leases.expires < ? RETURNING node",
                (name, node, now + seconds, now),
            ).fetchone()
            return row is not None

        return self._write(work)

    def renew_lease(self, name: str, node: str, seconds: float) -> bool:
        """Extend ``node``'s lease ``name`` to ``seconds`` from now; False when it does
        not hold it any more (another node took it over, or it was released). Never
        creates a lease, unlike :meth:`take_lease`."""

        def work(db: Database) -> bool:
            now = db.clock()
            return (
                db.execute(
                    "UPDATE leases SET expires=? WHERE name=? AND node=?",
                    (now + seconds, name, node),
                ).rowcount
                > 0
            )

        return self._write(work)

    def claim_runs(
        self,
        node: str,
        seconds: float,
        limit: int,
        exclude: Sequence[int] = (),
        run_ids: Sequence[int] = (),
    ) -> list[RunRow]:
        """Claim up to ``limit`` runs left ``running`` whose lease ``run:<run_id>`` is
        absent or expired (or already ``node``'s), oldest first, skipping ``exclude``
        (or only among ``run_ids`` when given): each one's lease taken for ``node`` for
        ``seconds``, all in one transaction. PostgreSQL: ``FOR UPDATE SKIP LOCKED`` passes
        over the runs another node is claiming; of several nodes claiming at once exactly
        one gets each run."""
        if limit <= 0:
            return []
        sql = (
            "SELECT r.* FROM runs r WHERE r.state=? AND NOT EXISTS (SELECT 1 FROM leases l"
            " WHERE l.name = 'run:' || CAST(r.run_id AS TEXT) AND l.node <> ?"
            " AND l.expires >= ?)"
        )
        more: list[Any] = []
        if exclude:
            sql += f" AND r.run_id NOT IN ({','.join('?' * len(exclude))})"
            more.extend(exclude)
        if run_ids:
            sql += f" AND r.run_id IN ({','.join('?' * len(run_ids))})"
            more.extend(run_ids)
        sql += " ORDER BY r.run_id LIMIT ?"
        if not run_ids:  # asked every second: a write transaction only when there is work
            clock = self._clock()
            if not self.query(sql, [str(RunState.RUNNING), node, clock, *more, limit]):
                return []

        def work(db: Database) -> list[RunRow]:
            now = db.clock()
            params = [str(RunState.RUNNING), node, now, *more, limit]
            found = db.execute(sql + db.skip_locked("r"), params).fetchall()
            rows = [_run_row(r) for r in found]
            for run in rows:
                db.execute(
                    "INSERT INTO leases (name, node, expires) VALUES (?, ?, ?) ON CONFLICT"
                    " (name) DO UPDATE SET node=excluded.node, expires=excluded.expires",
                    (RUN_LEASE.format(run.run_id), node, now + seconds),
                )
                db.execute("UPDATE runs SET node=? WHERE run_id=?", (node, run.run_id))
            return [replace(run, node=node) for run in rows]

        return self._write(work)

    def claim_run(self, run_id: int, node: str, seconds: float) -> bool:
        """Take the lease of run ``run_id`` for ``node`` if the run is still ``running``
        and no other node holds its lease (see :meth:`claim_runs`)."""
        return bool(self.claim_runs(node, seconds, 1, run_ids=(run_id,)))

    def live_nodes(self, role: str, seconds: float) -> list[str]:
        """The nodes with ``role`` whose heartbeat is at most ``seconds`` old."""
        now = self._clock()
        rows = self.query(
            "SELECT node, roles FROM nodes WHERE heartbeat >= ? ORDER BY node", (now - seconds,)
        )
        return [r["node"] for r in rows if role in r["roles"].split(",")]

    def interrupt_dead_sends(self, seconds: float) -> int:
        """Sends left ``sending`` by a node whose heartbeat is more than ``seconds`` old
        (dead, or stalled past its leases): each recorded ``interrupted``, its run and
        study ``send_failed`` (never repeated by itself; ``resend`` sends again), as
        :meth:`recover` does for a node's own. One transaction; how many."""
        reason = "send interrupted: the node that opened it stopped answering"
        if not self.query(
            "SELECT 1 FROM sends WHERE state=? AND node <> ? LIMIT 1",
            (str(SendState.SENDING), self.node),
        ):
            return 0  # no other node's send open: no write transaction (asked every second)

        def work(db: Database) -> list[Row]:
            now = db.clock()
            rows = list(
                db.execute(
                    "SELECT s.send_id, s.run_id, r.gateway_id, r.study_uid, st.state, s.node"
                    " FROM sends s JOIN runs r USING (run_id) LEFT JOIN studies st"
                    " ON st.gateway_id = r.gateway_id AND st.study_uid = r.study_uid"
                    " JOIN nodes n ON n.node = s.node WHERE s.state=? AND s.node <> ?"
                    " AND n.heartbeat < ? ORDER BY s.send_id",
                    (str(SendState.SENDING), self.node, now - seconds),
                )
            )
            wall = time.time()
            for send_id, run_id, gid, suid, study_state, opener in rows:
                t = _interrupted(
                    (gid, suid, run_id, send_id),
                    study_state,
                    reason,
                    f"node {opener} stopped answering during the send",
                    f"send {send_id} interrupted: node {opener} is gone",
                )
                self._apply_in(db, t, wall)
            return rows

        rows = self._write(work)
        for row in rows:
            logger.warning(
                "gateway=%s study=%s send %d of node %s interrupted (node gone);"
                " not repeated by itself",
                row[2],
                row[3],
                row[0],
                row[5],
            )
        return len(rows)

    def queued_sends(self, limit: int = 100) -> list[QueuedSend]:
        """Sends ``queued`` (by any node), oldest first."""
        rows = self.query(
            _QUEUED_SENDS + " ORDER BY s.send_id LIMIT ?",
            (str(SendState.QUEUED), limit),
        )
        return [_queued_send(r) for r in rows]

    def release_lease(self, name: str, node: str) -> bool:
        """Give up ``name`` if ``node`` holds it; True when it did."""
        return self._write(
            lambda db: (
                db.execute("DELETE FROM leases WHERE name=? AND node=?", (name, node)).rowcount > 0
            )
        )

    def leases(self) -> list[dict[str, Any]]:
        """Every lease: name, node, expires and whether it is still ``live`` now."""
        now = self._clock()
        rows = self.query("SELECT name, node, expires FROM leases ORDER BY name")
        return [{**dict(r), "live": r["expires"] >= now} for r in rows]

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that has recorded a heartbeat: node, roles, started, heartbeat, the
        heartbeat's ``age_s`` and the ``leases`` it holds (live ones), by the database's
        clock."""
        now = self._clock()
        held: dict[str, list[str]] = {}
        for lease in self.leases():
            if lease["live"]:
                held.setdefault(lease["node"], []).append(lease["name"])
        rows = self.query("SELECT node, roles, started, heartbeat FROM nodes ORDER BY node")
        return [
            {
                **dict(r),
                "roles": [x for x in r["roles"].split(",") if x],
                "age_s": now - r["heartbeat"],
                "leases": held.get(r["node"], []),
            }
            for r in rows
        ]

    # -- reads ------------------------------------------------------------------------------

    def study_state(self, gateway_id: str, study_uid: str) -> tuple[StudyState, str] | None:
        rows = self.query(
            "SELECT state, reason FROM studies WHERE gateway_id=? AND study_uid=?",
            (printable(gateway_id), printable(study_uid)),
        )
        return (StudyState(rows[0]["state"]), rows[0]["reason"]) if rows else None

    def finished_listing(self, gateway_id: str, folder: str) -> bytes | None:
        """The listing digest a study folder had when it last finished, if it did."""
        rows = self.query(
            "SELECT listing FROM finished_listings WHERE gateway_id=? AND folder=?",
            (printable(gateway_id), printable(folder)),
        )
        return bytes(rows[0]["listing"]) if rows else None

    def known_instances(self, gateway_id: str, study_uid: str) -> dict[str, Row]:
        """Recorded instances of a study keyed by path (for skipping re-hashing)."""
        rows = self.query(
            "SELECT * FROM instances WHERE gateway_id=? AND study_uid=?", (gateway_id, study_uid)
        )
        return {r["path"]: r for r in rows}

    def find_run(
        self,
        gateway_id: str,
        study_uid: str,
        inputs_digest: str,
        model_name: str,
        model_version: str,
    ) -> RunRow | None:
        """The latest run of exactly these inputs with this model version, if any."""
        rows = self.query(
            "SELECT * FROM runs WHERE gateway_id=? AND study_uid=? AND inputs_digest=?"
            " AND model_name=? AND model_version=? ORDER BY generation DESC LIMIT 1",
            (gateway_id, study_uid, inputs_digest, model_name, model_version),
        )
        return _run_row(rows[0]) if rows else None

    def next_generation(self, gateway_id: str, study_uid: str, inputs_digest: str) -> int:
        rows = self.query(
            "SELECT COALESCE(MAX(generation), -1) + 1 AS g FROM runs"
            " WHERE gateway_id=? AND study_uid=? AND inputs_digest=?",
            (gateway_id, study_uid, inputs_digest),
        )
        return int(rows[0]["g"])

    def get_run(self, run_id: int) -> RunRow | None:
        rows = self.query("SELECT * FROM runs WHERE run_id=?", (run_id,))
        return _run_row(rows[0]) if rows else None

    def runs(self, gateway_id: str | None = None, study_uid: str | None = None) -> list[RunRow]:
        sql, params = "SELECT * FROM runs WHERE 1=1", []
        if gateway_id is not None:
            sql += " AND gateway_id=?"
            params.append(gateway_id)
        if study_uid is not None:
            sql += " AND study_uid=?"
            params.append(study_uid)
        return [_run_row(r) for r in self.query(sql + " ORDER BY run_id", params)]

    def runs_in_state(self, *states: RunState) -> list[RunRow]:
        marks = ",".join("?" * len(states))
        rows = self.query(
            f"SELECT * FROM runs WHERE state IN ({marks}) ORDER BY run_id", [str(s) for s in states]
        )
        return [_run_row(r) for r in rows]

    def outputs(self, run_id: int) -> list[Row]:
        return self.query("SELECT * FROM outputs WHERE run_id=? ORDER BY path", (run_id,))

    def sends(self, run_id: int) -> list[Row]:
        return self.query("SELECT * FROM sends WHERE run_id=? ORDER BY send_id", (run_id,))

    # -- read side: reports for the CLI --------------------------------------------------
    # Queries behind ``status``, ``studies``, ``study``, ``resend`` and ``reprocess``. They
    # only read, and work on a ledger opened with :meth:`open_readonly` (also one written
    # by an older version, before :func:`_migrate` added its columns).

    @classmethod
    def open_readonly(cls, location: Path | str) -> Ledger | None:
        """Open an existing ledger read-only, or None when there is none.

        SQLite: ``mode=ro``; creates neither STATE nor the ledger (SQLite itself may create
        the ``-wal``/``-shm`` side files a reader of a WAL database needs). PostgreSQL: a
        read-only session; None while the database has no ledger tables yet. Never
        migrates or writes."""
        url = is_url(location)
        if not url and not Path(location).is_file():
            return None
        ledger = cls.__new__(cls)
        ledger.path = location if url else Path(location)
        ledger._lock = threading.RLock()
        ledger.observers = []
        ledger.node = ""
        try:
            ledger._db = open_database(ledger.path, readonly=True)
            if url and not ledger._db.columns("studies"):
                ledger._db.close()
                return None
        except Exception as exc:
            if isinstance(exc, DRIVER_ERRORS):
                raise ledger._unavailable(exc) from exc
            raise
        return ledger

    def gateway_ids(self) -> list[str]:
        """Every gateway the ledger knows: discovered, or with studies recorded."""
        rows = self.query(
            "SELECT gateway_id FROM gateways UNION SELECT gateway_id FROM studies"
            " ORDER BY gateway_id"
        )
        return [r["gateway_id"] for r in rows]

    def study_counts(self, gateway_id: str) -> dict[str, int]:
        """Number of studies of ``gateway_id`` per state."""
        rows = self.query(
            "SELECT state, COUNT(*) AS n FROM studies WHERE gateway_id=? GROUP BY state",
            (gateway_id,),
        )
        return {r["state"]: int(r["n"]) for r in rows}

    def oldest_waiting_study(self, gateway_id: str) -> dict[str, Any] | None:
        """The study of ``gateway_id`` first seen longest ago among those not yet run
        (receiving, waiting, waiting_model, ready): study_uid, state, reason, first_seen."""
        waiting = [
            StudyState.RECEIVING,
            StudyState.WAITING,
            StudyState.WAITING_MODEL,
            StudyState.READY,
        ]
        rows = self.query(
            "SELECT study_uid, state, reason, first_seen FROM studies WHERE gateway_id=?"
            " AND state IN (?,?,?,?) ORDER BY first_seen LIMIT 1",
            (gateway_id, *[str(s) for s in waiting]),
        )
        return dict(rows[0]) if rows else None

    def latest_events(self, gateway_id: str, limit: int = 5) -> list[dict[str, Any]]:
        """The newest ``limit`` events of ``gateway_id``, newest first."""
        rows = self.query(
            "SELECT level, study_uid, message, ts FROM events WHERE gateway_id=?"
            " ORDER BY event_id DESC LIMIT ?",
            (gateway_id, limit),
        )
        return [dict(r) for r in rows]

    def list_studies(
        self, gateway_id: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        """Studies (optionally of one gateway and/or in one state), ordered by gateway and
        last change: gateway_id, study_uid, state, reason, first_seen, updated (epoch
        seconds) and node (of the study's latest run; "" when none or not recorded)."""
        node = (
            "(SELECT r.node FROM runs r WHERE r.gateway_id=s.gateway_id"
            " AND r.study_uid=s.study_uid ORDER BY r.run_id DESC LIMIT 1)"
            if "node" in self._columns("runs")
            else "''"
        )
        sql = (
            "SELECT s.gateway_id, s.study_uid, s.state, s.reason, s.first_seen, s.updated,"
            f" COALESCE({node}, '') AS node FROM studies s WHERE 1=1"
        )
        params: list[Any] = []
        if gateway_id is not None:
            sql += " AND s.gateway_id=?"
            params.append(gateway_id)
        if state is not None:
            sql += " AND s.state=?"
            params.append(state)
        rows = self.query(sql + " ORDER BY s.gateway_id, s.updated, s.study_uid", params)
        return [dict(r) for r in rows]

    def study_history(self, gateway_id: str, study_uid: str) -> dict[str, Any] | None:
        """Everything recorded about one study, or None when the ledger has no such study.

        Keys: gateway_id, study_uid, state, reason, first_seen, updated; ``files`` (path
        relative to the study folder, state ok|rejected, reason, size, sop_instance_uid,
        series_uid, sop_class_uid); ``runs`` (run_id, model_name, model_version,
        generation, previous_run_id, state, reason, n_inputs, started, finished, timings,
        findings, node, ``outputs`` (path, sop_class_uid, sop_instance_uid, series_uid),
        ``sends`` (send_id, destination, state, reason, manual, started, finished,
        ``items`` (sop_instance_uid, status, status_code))); ``events`` (ts, level,
        message). Times are epoch seconds; no patient data is recorded in the ledger."""
        found = self.query(
            "SELECT gateway_id, study_uid, state, reason, first_seen, updated FROM studies"
            " WHERE gateway_id=? AND study_uid=?",
            (gateway_id, study_uid),
        )
        if not found:
            return None
        history: dict[str, Any] = dict(found[0])
        gateway_path = self.query("SELECT path FROM gateways WHERE gateway_id=?", (gateway_id,))
        folder = Path(gateway_path[0]["path"]) / study_uid if gateway_path else None
        history["files"] = [
            {
                "path": _path_in_study(r["path"], folder, study_uid),
                "state": r["state"],
                "reason": r["reason"],
                "size": r["size"],
                "sop_instance_uid": r["sop_instance_uid"],
                "series_uid": r["series_uid"],
                "sop_class_uid": r["sop_class_uid"],
            }
            for r in self.query(
                "SELECT * FROM instances WHERE gateway_id=? AND study_uid=? ORDER BY path",
                (gateway_id, study_uid),
            )
        ]
        has_node = "node" in self._columns("runs")
        runs: list[dict[str, Any]] = []
        for r in self.query(
            "SELECT * FROM runs WHERE gateway_id=? AND study_uid=? ORDER BY run_id",
            (gateway_id, study_uid),
        ):
            run: dict[str, Any] = {
                key: r[key]
                for key in (
                    "run_id",
                    "model_name",
                    "model_version",
                    "generation",
                    "previous_run_id",
                    "state",
                    "reason",
                    "n_inputs",
                    "started",
                    "finished",
                )
            }
            run["timings"] = json.loads(r["timings"] or "{}")
            run["findings"] = json.loads(r["findings"] or "{}")
            run["node"] = r["node"] if has_node else ""
            run["outputs"] = [
                {
                    "path": o["path"],
                    "sop_class_uid": o["sop_class_uid"],
                    "sop_instance_uid": o["sop_instance_uid"],
                    "series_uid": o["series_uid"],
                }
                for o in self.query(
                    "SELECT * FROM outputs WHERE run_id=? ORDER BY path", (r["run_id"],)
                )
            ]
            run["sends"] = []
            for s in self.query(
                "SELECT * FROM sends WHERE run_id=? ORDER BY send_id", (r["run_id"],)
            ):
                items = self.query(
                    "SELECT sop_instance_uid, status, status_code FROM send_items"
                    " WHERE send_id=? ORDER BY sop_instance_uid",
                    (s["send_id"],),
                )
                run["sends"].append(
                    {
                        "send_id": s["send_id"],
                        "destination": s["destination"],
                        "state": s["state"],
                        "reason": s["reason"],
                        "manual": bool(s["manual"]),
                        "started": s["started"],
                        "finished": s["finished"],
                        "items": [dict(i) for i in items],
                    }
                )
            runs.append(run)
        history["runs"] = runs
        history["events"] = [
            dict(e)
            for e in self.query(
                "SELECT ts, level, message FROM events WHERE gateway_id=? AND study_uid=?"
                " ORDER BY event_id",
                (gateway_id, study_uid),
            )
        ]
        return history

    def state_counts(self) -> dict[str, list[tuple[str, str, int]]]:
        """For ``/metrics``: (gateway_id, state, count) of ``studies``, ``runs`` and
        ``sends`` (a send counts under its run's gateway)."""
        sql = {
            "studies": "SELECT gateway_id, state, COUNT(*) FROM studies GROUP BY 1, 2",
            "runs": "SELECT gateway_id, state, COUNT(*) FROM runs GROUP BY 1, 2",
            "sends": "SELECT r.gateway_id, s.state, COUNT(*) FROM sends s"
            " JOIN runs r ON r.run_id = s.run_id GROUP BY 1, 2",
        }
        return {
            name: [(str(r[0]), str(r[1]), int(r[2])) for r in self.query(query)]
            for name, query in sql.items()
        }

    def run_timings(self) -> list[dict[str, Any]]:
        """For ``/metrics``: every run's gateway_id, model_name, timings (see
        :meth:`service.engine.Engine.execute_run`) and ``sent_at``, when its first
        successful send ended (epoch seconds; None when none did)."""
        ok = ", ".join(f"'{state}'" for state in sorted(SENT_OK))
        rows = self.query(
            "SELECT r.gateway_id, r.model_name, r.timings, (SELECT MIN(s.finished) FROM sends s"
            f" WHERE s.run_id = r.run_id AND s.state IN ({ok})) AS sent_at FROM runs r"
        )
        return [
            {
                "gateway_id": r["gateway_id"],
                "model_name": r["model_name"],
                "timings": json.loads(r["timings"] or "{}"),
                "sent_at": r["sent_at"],
            }
            for r in rows
        ]

    def _by_ids(self, select: str, column: str, ids: Collection[int]) -> list[Row]:
        """``select`` (ending in WHERE) for the rows whose ``column`` is one of ``ids``, read
        by their key in chunks of :data:`IN_CHUNK`."""
        wanted = sorted(set(ids))
        rows: list[Row] = []
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start : start + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows += self.query(f"{select} {column} IN ({marks})", chunk)
        return rows

    def metric_runs(
        self, after_run_id: int | None, run_ids: Collection[int] = ()
    ) -> list[dict[str, Any]]:
        """For ``/metrics``, what is new since a scrape: run_id, gateway_id, model_name,
        state and timings of the runs with an id above ``after_run_id`` (None: none) and of
        ``run_ids``, read by their key (the cost is the rows returned, not the history). A
        run's timings are written by the transition that ends its ``running``
        (:func:`service.record.run_transition`) and not changed after."""
        select = "SELECT run_id, gateway_id, model_name, state, timings FROM runs WHERE"
        rows = [] if after_run_id is None else self.query(f"{select} run_id > ?", (after_run_id,))
        rows += self._by_ids(select, "run_id", run_ids)
        return [
            {
                "run_id": int(r["run_id"]),
                "gateway_id": r["gateway_id"],
                "model_name": r["model_name"],
                "state": r["state"],
                "timings": json.loads(r["timings"] or "{}"),
            }
            for r in rows
        ]

    def metric_sends(
        self, after_send_id: int | None, send_ids: Collection[int] = ()
    ) -> list[dict[str, Any]]:
        """For ``/metrics``: send_id, run_id, state and finished (epoch seconds) of the sends
        with an id above ``after_send_id`` (None: none) and of ``send_ids``; read by key."""
        select = "SELECT send_id, run_id, state, finished FROM sends WHERE"
        rows = (
            [] if after_send_id is None else self.query(f"{select} send_id > ?", (after_send_id,))
        )
        rows += self._by_ids(select, "send_id", send_ids)
        return [_send_fields(r) for r in rows]

    def sends_of_runs(self, run_ids: Collection[int]) -> list[dict[str, Any]]:
        """For ``/metrics``: the fields of :meth:`metric_sends` of every send of ``run_ids``
        (through the ``sends_run`` index)."""
        select = "SELECT send_id, run_id, state, finished FROM sends WHERE"
        return [_send_fields(r) for r in self._by_ids(select, "run_id", run_ids)]

    def latest_run_with_outputs(self, gateway_id: str, study_uid: str) -> int | None:
        """The id of the study's latest run that wrote outputs (what ``resend`` sends)."""
        rows = self.query(
            "SELECT MAX(r.run_id) AS run_id FROM runs r WHERE r.gateway_id=? AND r.study_uid=?"
            " AND EXISTS (SELECT 1 FROM outputs o WHERE o.run_id=r.run_id)",
            (gateway_id, study_uid),
        )
        return None if rows[0]["run_id"] is None else int(rows[0]["run_id"])

    def _columns(self, table: str) -> set[str]:
        with self._lock:
            return self._db.columns(table)

    # -- moving from SQLite to PostgreSQL ------------------------------------------------

    def import_sqlite(self, source: Path) -> dict[str, int]:
        """Copy the SQLite ledger ``source`` into this ledger, a PostgreSQL one with no
        rows yet, in one transaction: every table of the schema but nodes and leases
        (:data:`IMPORTED_TABLES`), with their ids, then the identities past the largest.
        ``source`` is first brought to the current schema (this ledger was, when opened)
        and held locked (SQLite ``BEGIN IMMEDIATE``) until the copy commits. Returns the
        rows copied per table. Refused (:class:`ImportRefused`, nothing written here) when
        this ledger is not PostgreSQL or has rows, or when ``source`` is no ledger or
        records a run ``running`` or a send ``sending`` (a service still running, or one
        that did not stop cleanly)."""
        if not is_url(self.path):
            raise ImportRefused(
                f"the target ledger {self.description} is not PostgreSQL: set [service] ledger"
                " (GATEWAY_LEDGER) to the postgresql:// URL to import into"
            )
        _check_ledger_file(source)
        old = Ledger(source)
        try:
            counts = old._write(lambda sdb: self._write(lambda tdb: _copy(sdb, tdb, source)))
        finally:
            old.close()
        logger.info(
            "ledger %s: imported %s (%s)",
            self.description,
            source,
            ", ".join(f"{table} {n}" for table, n in counts.items()),
        )
        return counts


@dataclass(frozen=True)
class QueuedSend:
    send_id: int
    run_id: int
    gateway_id: str
    study_uid: str
    manual: bool = False


@dataclass(frozen=True)
class Recovery:
    interrupted: int = 0
    queued: list[QueuedSend] = field(default_factory=list)


NODES_AND_LEASES = """
CREATE TABLE IF NOT EXISTS nodes (     -- the services recording in this ledger
    node TEXT PRIMARY KEY,
    roles TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    heartbeat REAL NOT NULL           -- the database's clock at the node's last heartbeat
);
CREATE TABLE IF NOT EXISTS leases (    -- work held by one node until it expires
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    expires REAL NOT NULL             -- the database's clock
);
"""


#: a run's sends without reading every send (``/metrics`` reads the sends of the runs whose
#: first successful send just ended; a study's history, ``resend``)
SENDS_BY_RUN = "CREATE INDEX IF NOT EXISTS sends_run ON sends (run_id)"

#: ids per ``IN (...)`` list of a read (well below SQLite's and PostgreSQL's limits)
IN_CHUNK = 500


@dataclass(frozen=True)
class Migration:
    """One numbered step of the ledger's schema: DDL statements (``IF NOT EXISTS``), or a
    column added when the table lacks it (a ledger written before ``schema_version``
    existed may already have it)."""

    version: int
    description: str
    statements: tuple[str, ...] = ()
    add_column: tuple[str, str, str] | None = None  # (table, column, definition)


def _statements(script: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in script.split(";") if part.strip())


#: The schema, step by step. A ledger records the steps it has had in ``schema_version``;
#: opening it for writing applies the later ones (SQLite column types; PostgreSQL's are
#: translated by :mod:`service.ledgerdb`). Append, never edit, a released step.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tables", statements=_statements(SCHEMA)),
    Migration(2, "runs.node", add_column=("runs", "node", "TEXT NOT NULL DEFAULT ''")),
    Migration(3, "sends.opened", add_column=("sends", "opened", "REAL")),
    Migration(4, "nodes and leases", statements=_statements(NODES_AND_LEASES)),
    Migration(5, "sends.node", add_column=("sends", "node", "TEXT NOT NULL DEFAULT ''")),
    Migration(6, "sends by run", statements=(SENDS_BY_RUN,)),
)

SCHEMA_VERSION = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
    " description TEXT NOT NULL, applied REAL NOT NULL)"
)


@contextmanager
def _transaction(db: Database, *, serializable: bool = True) -> Iterator[None]:
    """One write transaction on ``db``: committed when the block ends, rolled back whole
    when it raises (a failed rollback is logged; the block's exception goes on)."""
    db.begin(serializable=serializable)
    try:
        yield
    except BaseException:
        try:
            db.rollback()
        except db.errors:
            logger.exception("ledger rollback failed")
        raise
    db.commit()


def _migrate(db: Database) -> None:
    """Bring the ledger's tables up to the last of :data:`MIGRATIONS`, in one write
    transaction under the migration lock (so that two processes, or two nodes, opening an
    old ledger at once apply each step once)."""
    with _transaction(db, serializable=False):
        db.lock_for_migration()
        db.execute(db.ddl(SCHEMA_VERSION))
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = int(row[0] or 0)
        for step in MIGRATIONS:
            if step.version <= current:
                continue
            for statement in step.statements:
                db.execute(db.ddl(statement))
            if step.add_column is not None:
                table, column, definition = step.add_column
                if column not in db.columns(table):
                    db.execute(db.ddl(f"ALTER TABLE {table} ADD COLUMN {column} {definition}"))
                    logger.info("ledger: added column %s.%s", table, column)
            db.execute(
                "INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
                (step.version, step.description, time.time()),
            )
            logger.info(
                "ledger %s: schema step %d (%s)", db.description, step.version, step.description
            )


def _created_tables(migrations: Sequence[Migration]) -> tuple[str, ...]:
    return tuple(
        m.group(1)
        for step in migrations
        for statement in step.statements
        if (m := re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", statement))
    )


#: the tables :meth:`Ledger.import_sqlite` copies, in an order that keeps references
#: (runs before outputs and sends, sends before send_items): every table of the schema but
#: those of the live nodes (``nodes``, ``leases``: each node records itself) and
#: ``schema_version`` (each ledger's own)
IMPORTED_TABLES = tuple(t for t in _created_tables(MIGRATIONS) if t not in ("nodes", "leases"))
#: (table, column) of the ids the database assigns (``INTEGER PRIMARY KEY AUTOINCREMENT``)
IDENTITIES = tuple(
    (m.group(1), m.group(2))
    for step in MIGRATIONS
    for statement in step.statements
    if (
        m := re.match(
            r"CREATE TABLE IF NOT EXISTS (\w+) \(\s*(\w+) INTEGER PRIMARY KEY AUTOINCREMENT",
            statement,
        )
    )
)


def _check_ledger_file(path: Path) -> None:
    """Refuse ``path`` unless it is an SQLite file with the first schema step's tables."""
    if not path.is_file():
        raise ImportRefused(f"{path} does not exist: name the old service's STATE/ledger.sqlite3")
    try:
        db = open_database(path, readonly=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except DRIVER_ERRORS as exc:
        raise ImportRefused(f"{path} is not a ledger: {exc}") from exc
    missing = sorted(set(_created_tables(MIGRATIONS[:1])) - tables)
    if missing:
        raise ImportRefused(f"{path} is not a ledger: it has no table {', '.join(missing)}")


def _copy(source: Database, target: Database, path: Path) -> dict[str, int]:
    """The copy of :meth:`Ledger.import_sqlite`, in the transactions of both."""
    running = source.execute(
        "SELECT (SELECT COUNT(*) FROM runs WHERE state=?), (SELECT COUNT(*) FROM sends"
        " WHERE state=?)",
        (str(RunState.RUNNING), str(SendState.SENDING)),
    ).fetchone()
    if running[0] or running[1]:
        raise ImportRefused(
            f"{path} records {running[0]} run(s) running and {running[1]} send(s) sending:"
            " its service is still running or did not stop cleanly; run it once more on its"
            " SQLite ledger (`serve --once`: it resumes the runs and records the open sends"
            " interrupted) and import again"
        )
    filled = {
        table: n
        for table in IMPORTED_TABLES
        if (n := int(target.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]))
    }
    if filled:
        found = ", ".join(f"{table} {n}" for table, n in filled.items())
        raise ImportRefused(
            f"the target ledger {target.description} is not empty ({found}): import only"
            " into a new, empty database, before any node started on it"
        )
    counts: dict[str, int] = {}
    for table in IMPORTED_TABLES:
        columns = sorted(source.columns(table))
        if set(columns) != target.columns(table):
            raise ImportRefused(
                f"{path}: table {table} has columns {', '.join(columns)}, the target"
                f" {', '.join(sorted(target.columns(table)))} (a ledger of another version)"
            )
        names = ", ".join(columns)
        rows = [tuple(r) for r in source.execute(f"SELECT {names} FROM {table}")]
        target.executemany(
            f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})", rows
        )
        counts[table] = len(rows)
    for table, column in IDENTITIES:
        target.advance_identity(table, column)
    return counts


#: The queued sends with their run's gateway and study (a :func:`_queued_send` per row).
_QUEUED_SENDS = (
    "SELECT s.send_id, s.run_id, r.gateway_id, r.study_uid, s.manual FROM sends s"
    " JOIN runs r USING (run_id) WHERE s.state=?"
)


def _queued_send(row: Row) -> QueuedSend:
    return QueuedSend(row[0], row[1], row[2], row[3], bool(row[4]))


def _interrupted(
    send: tuple[str, str, int, int], study_state: str | None, reason: str, why: str, event: str
) -> Transition:
    """A send left open whose outcome is unknown, ``send`` = (gateway, study, run, send
    id): the send ``interrupted`` (``why``), its run ``send_failed``, and its study
    ``send_failed`` (``reason``) when it is ``sending``; never repeated by itself."""
    gid, suid, run_id, send_id = send
    return Transition(
        gid,
        suid,
        StudyState.SEND_FAILED if study_state == StudyState.SENDING else None,
        reason,
        run_id=run_id,
        run=RunState.SEND_FAILED,
        send=SendChange(SendState.INTERRUPTED, send_id, reason=why),
        events=[("WARNING", event)],
    )


def _label(t: Transition) -> str:
    """A transition's failpoint label: the study state it sets, else the run's, else the
    send's, else ``event``."""
    return str(t.study or t.run or (t.send.state if t.send else "") or "event")


def _log_change(t: Transition, applied: Applied) -> None:
    if applied.study_changed:
        reason = printable(t.reason)
        logger.info(
            "gateway=%s study=%s state=%s%s",
            printable(t.gateway_id),
            printable(t.study_uid),
            t.study,
            f" reason={reason}" if reason else "",
        )


def _path_in_study(path: str, folder: Path | None, study_uid: str) -> str:
    """A recorded input path relative to its study folder (as the gateway app wrote it)."""
    recorded = Path(path)
    if folder is not None and recorded.is_relative_to(folder):
        return recorded.relative_to(folder).as_posix()
    parts = recorded.parts
    if study_uid in parts:  # the folder moved since: take what follows the study's name
        index = len(parts) - 1 - parts[::-1].index(study_uid)
        if index < len(parts) - 1:
            return Path(*parts[index + 1 :]).as_posix()
    return recorded.name


def _send_fields(row: Row) -> dict[str, Any]:
    return {
        "send_id": int(row["send_id"]),
        "run_id": int(row["run_id"]),
        "state": row["state"],
        "finished": row["finished"],
    }


def _run_row(row: Row) -> RunRow:
    return RunRow(
        run_id=row["run_id"],
        gateway_id=row["gateway_id"],
        study_uid=row["study_uid"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        inputs_digest=row["inputs_digest"],
        generation=row["generation"],
        state=RunState(row["state"]),
        reason=row["reason"],
        findings=json.loads(row["findings"]),
        node=row["node"] if "node" in row.keys() else "",  # noqa: SIM118 (Row)
    )
