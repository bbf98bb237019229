"""The ledger: an embedded SQLite database in ``STATE/`` recording everything the service did.

Tables: gateways, studies, instances, runs, outputs, sends, send_items, events. Study and run
states are explicit (:class:`StudyState`, :class:`RunState`); every row is keyed by gateway.
A run is unique per (gateway, study, inputs digest, model name, model version, generation):
repeated events or restarts never run the same inputs twice; ``reprocess`` bumps generation.
"""

from __future__ import annotations

import enum
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # files seen, not yet stable/complete
    WAITING = "waiting"  # stable, but image.db lists instances not on disk yet
    WAITING_MODEL = "waiting_model"  # routed to a model that is not ready (weights missing)
    READY = "ready"
    RUNNING = "running"
    WRITTEN = "written"  # outputs written, no destination or send not yet done
    SENDING = "sending"
    SENT = "sent"
    SEND_FAILED = "send_failed"
    FAILED = "failed"
    SKIPPED = "skipped"


class RunState(enum.StrEnum):
    RUNNING = "running"
    WRITTEN = "written"
    SENDING = "sending"
    SENT = "sent"
    SEND_FAILED = "send_failed"
    FAILED = "failed"
    SKIPPED = "skipped"


FINAL_RUN_STATES = {RunState.SENT, RunState.SEND_FAILED, RunState.FAILED, RunState.SKIPPED}

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
    node TEXT NOT NULL DEFAULT '',   -- service.node_name of the service that ran it
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
    state TEXT NOT NULL,             -- sending | a SendStatus value | interrupted
    reason TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL,
    manual INTEGER NOT NULL DEFAULT 0
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


class Ledger:
    """Thread-safe access to the ledger database (one connection, serialised)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)
        _migrate(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params))

    # -- gateways, studies, events -------------------------------------------------------

    def add_gateway(self, gateway_id: str, path: Path) -> bool:
        """Record a gateway; True when it was new."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO gateways VALUES (?, ?, ?)",
                (gateway_id, str(path), time.time()),
            )
            return cur.rowcount > 0

    def study_state(self, gateway_id: str, study_uid: str) -> tuple[StudyState, str] | None:
        rows = self.query(
            "SELECT state, reason FROM studies WHERE gateway_id=? AND study_uid=?",
            (gateway_id, study_uid),
        )
        return (StudyState(rows[0]["state"]), rows[0]["reason"]) if rows else None

    def set_study_state(
        self, gateway_id: str, study_uid: str, state: StudyState, reason: str = ""
    ) -> bool:
        """Set a study's state; logs and returns True only when it changed."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT state, reason FROM studies WHERE gateway_id=? AND study_uid=?",
                (gateway_id, study_uid),
            ).fetchone()
            if row is not None and row["state"] == state and row["reason"] == reason:
                return False
            db.execute(
                "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT"
                " (gateway_id, study_uid) DO UPDATE SET state=excluded.state,"
                " reason=excluded.reason, updated=excluded.updated",
                (gateway_id, study_uid, str(state), reason, now, now),
            )
        logger.info(
            "gateway=%s study=%s state=%s%s",
            gateway_id,
            study_uid,
            state,
            f" reason={reason}" if reason else "",
        )
        return True

    def finished_listing(self, gateway_id: str, folder: str) -> bytes | None:
        """The listing digest a study folder had when it last finished, if it did."""
        rows = self.query(
            "SELECT listing FROM finished_listings WHERE gateway_id=? AND folder=?",
            (gateway_id, folder),
        )
        return bytes(rows[0]["listing"]) if rows else None

    def set_finished_listing(self, gateway_id: str, folder: str, listing: bytes) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO finished_listings (gateway_id, folder, listing)"
                " VALUES (?, ?, ?)",
                (gateway_id, folder, listing),
            )

    def forget_listings_of_interrupted_runs(self) -> int:
        """Drop the finished listing of every study with a run still ``running`` (the
        service stopped during it), so that the next look at the study resumes the run."""
        with self.transaction() as db:
            cursor = db.execute(
                "DELETE FROM finished_listings WHERE (gateway_id, folder) IN"
                " (SELECT gateway_id, study_uid FROM runs WHERE state = ?)",
                (RunState.RUNNING.value,),
            )
            return cursor.rowcount

    def event(self, gateway_id: str, study_uid: str, level: str, message: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events (ts, gateway_id, study_uid, level, message)"
                " VALUES (?, ?, ?, ?, ?)",
                (time.time(), gateway_id, study_uid, level, message),
            )

    # -- instances -------------------------------------------------------------------------

    def record_instances(
        self, gateway_id: str, study_uid: str, records: Sequence[InstanceRecord]
    ) -> None:
        """Record a study's files (used or rejected with the reason) in one transaction."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT"
                " (gateway_id, path) DO UPDATE SET study_uid=excluded.study_uid,"
                " size=excluded.size, mtime_ns=excluded.mtime_ns, sha256=excluded.sha256,"
                " sop_instance_uid=excluded.sop_instance_uid, series_uid=excluded.series_uid,"
                " sop_class_uid=excluded.sop_class_uid, state=excluded.state,"
                " reason=excluded.reason, updated=excluded.updated",
                [
                    (
                        gateway_id,
                        study_uid,
                        r.path,
                        r.size,
                        r.mtime_ns,
                        r.sha256,
                        r.sop_instance_uid,
                        r.series_uid,
                        r.sop_class_uid,
                        "rejected" if r.rejected_reason else "ok",
                        r.rejected_reason,
                        now,
                    )
                    for r in records
                ],
            )

    def known_instances(self, gateway_id: str, study_uid: str) -> dict[str, sqlite3.Row]:
        """Recorded instances of a study keyed by path (for skipping re-hashing)."""
        rows = self.query(
            "SELECT * FROM instances WHERE gateway_id=? AND study_uid=?", (gateway_id, study_uid)
        )
        return {r["path"]: r for r in rows}

    # -- runs ------------------------------------------------------------------------------

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

    def start_run(
        self,
        gateway_id: str,
        study_uid: str,
        model_name: str,
        model_version: str,
        inputs_digest: str,
        n_inputs: int,
        generation: int = 0,
        node: str = "",
    ) -> int:
        """Create a run in state ``running`` and return its id (``node``: the
        ``service.node_name`` of the service running it)."""
        with self.transaction() as db:
            prev = db.execute(
                "SELECT MAX(run_id) FROM runs WHERE gateway_id=? AND study_uid=?",
                (gateway_id, study_uid),
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO runs (gateway_id, study_uid, model_name, model_version,"
                " inputs_digest, generation, previous_run_id, state, n_inputs, started, node)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    gateway_id,
                    study_uid,
                    model_name,
                    model_version,
                    inputs_digest,
                    generation,
                    prev,
                    str(RunState.RUNNING),
                    n_inputs,
                    time.time(),
                    node,
                ),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def next_generation(self, gateway_id: str, study_uid: str, inputs_digest: str) -> int:
        rows = self.query(
            "SELECT COALESCE(MAX(generation), -1) + 1 AS g FROM runs"
            " WHERE gateway_id=? AND study_uid=? AND inputs_digest=?",
            (gateway_id, study_uid, inputs_digest),
        )
        return int(rows[0]["g"])

    def set_run_state(
        self,
        run_id: int,
        state: RunState,
        reason: str = "",
        *,
        timings: dict[str, float] | None = None,
        findings: dict[str, Any] | None = None,
    ) -> None:
        sets = ["state=?", "reason=?"]
        params: list[Any] = [str(state), reason]
        if state in FINAL_RUN_STATES or state == RunState.WRITTEN:
            sets.append("finished=?")
            params.append(time.time())
        if timings is not None:
            sets.append("timings=?")
            params.append(json.dumps(timings, sort_keys=True))
        if findings is not None:
            sets.append("findings=?")
            params.append(json.dumps(findings, sort_keys=True))
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id=?", [*params, run_id])

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

    # -- outputs and sends -----------------------------------------------------------------

    def add_output(
        self, run_id: int, path: Path, sop_class_uid: str, sop_instance_uid: str, series_uid: str
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO outputs VALUES (?,?,?,?,?)",
                (run_id, str(path), sop_class_uid, sop_instance_uid, series_uid),
            )

    def outputs(self, run_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM outputs WHERE run_id=? ORDER BY path", (run_id,))

    def start_send(self, run_id: int, destination: str, manual: bool = False) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO sends (run_id, destination, state, started, manual)"
                " VALUES (?,?,?,?,?)",
                (run_id, destination, "sending", time.time(), int(manual)),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish_send(
        self,
        send_id: int,
        state: str,
        reason: str,
        items: Sequence[tuple[str, str, int | None]] = (),
    ) -> None:
        """Record a send's outcome and its per-instance (SOP UID, status, code) results."""
        with self.transaction() as db:
            db.execute(
                "UPDATE sends SET state=?, reason=?, finished=? WHERE send_id=?",
                (state, reason, time.time(), send_id),
            )
            db.executemany(
                "INSERT OR REPLACE INTO send_items VALUES (?,?,?,?)",
                [(send_id, uid, status, code) for uid, status, code in items],
            )

    def sends(self, run_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM sends WHERE run_id=? ORDER BY send_id", (run_id,))

    def interrupted_sends(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM sends WHERE state='sending'")

    # -- read side: reports for the CLI --------------------------------------------------
    # Queries behind ``status``, ``studies``, ``study``, ``resend`` and ``reprocess``. They
    # only read, and work on a ledger opened with :meth:`open_readonly` (also one written
    # by an older version, before :func:`_migrate` added its columns).

    @classmethod
    def open_readonly(cls, path: Path) -> Ledger | None:
        """Open an existing ledger read-only (SQLite ``mode=ro``), or None when there is none.

        Creates neither STATE nor the ledger, never migrates or writes it. (SQLite itself may
        create the ``-wal``/``-shm`` side files a reader of a WAL database needs.)"""
        if not path.is_file():
            return None
        ledger = cls.__new__(cls)
        ledger.path = path
        ledger._lock = threading.RLock()
        ledger._db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            check_same_thread=False,
            isolation_level=None,
        )
        ledger._db.row_factory = sqlite3.Row
        ledger._db.execute("PRAGMA busy_timeout=10000")
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
        (receiving, waiting, waiting_model, ready): study_uid, state, first_seen."""
        waiting = [
            StudyState.RECEIVING,
            StudyState.WAITING,
            StudyState.WAITING_MODEL,
            StudyState.READY,
        ]
        rows = self.query(
            "SELECT study_uid, state, first_seen FROM studies WHERE gateway_id=? AND state IN"
            " (?,?,?,?) ORDER BY first_seen LIMIT 1",
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
            return _columns(self._db, table)


#: Columns added after the first release: (table, column, definition). A ledger written by
#: an older version gets them with ALTER TABLE when it is opened for writing.
MIGRATIONS: tuple[tuple[str, str, str], ...] = (("runs", "node", "TEXT NOT NULL DEFAULT ''"),)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an existing ledger's tables up to :data:`SCHEMA` (idempotent; in one write
    transaction, so two processes opening an old ledger at once add each column once)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, column, definition in MIGRATIONS:
            if column not in _columns(db, table):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                logger.info("ledger: added column %s.%s", table, column)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


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


def _run_row(row: sqlite3.Row) -> RunRow:
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
    )
