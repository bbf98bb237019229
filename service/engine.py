"""The gateway engine: schedules touched study folders through the stages.

Watcher events only mark a study as *touched*; on each tick the engine asks readiness
(quiet period on a monotonic clock, every file complete DICOM, image.db's instances present
or ``max_wait_seconds`` elapsed) whether a study is ready, routes it, starts its run in the
pipeline, records each stage's outcome as one ledger transition and hands written results
to the outbox, which makes the one send attempt. Conditions that may pass (I/O errors, a
mount that is away, a locked image.db, a full disk) make the study wait and be tried
again with a bounded backoff; only content problems end it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from service import assembly, requests
from service.assembly import Assembler, Stability
from service.config import GATEWAY_ID_RE, Config
from service.conformance import quarantine_file
from service.errors import TransientError
from service.fsutil import is_within, sweep_temp_files
from service.imagedb import ImageDb
from service.ledger import (
    InstanceRecord,
    Ledger,
    LedgerUnavailable,
    NewRun,
    OutputRecord,
    QueuedSend,
    SendChange,
    Transition,
    printable,
)
from service.models.base import Model, RunContext, select_model
from service.outbox import Outbox, describe
from service.pipeline import Job as PipelineJob
from service.pipeline import Outcome, Pipeline
from service.uids import UidFactory
from service.values import (
    SENT_OK,
    FileState,
    Rejected,
    RunState,
    SendState,
    Snapshot,
    Study,
    StudyState,
)

logger = logging.getLogger(__name__)

GATEWAY_PREFIX = "gateway_"
#: Seconds between re-checks of a study waiting for a model or for image.db's instances.
RECHECK_SECONDS = 5.0
#: First and longest wait before a study that hit a transient error is tried again.
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
#: Rejected files logged one by one per study check; the rest are counted in one line.
MAX_REJECT_LOG_LINES = 20


def retry_delay(attempt: int) -> float:
    """Bounded exponential backoff: 5, 10, 20 … seconds, at most 300 (attempt ≥ 1)."""
    return float(min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, attempt - 1)))


@dataclass
class _Pending:
    first_seen: float
    stable_since: float | None = None  # monotonic time the study was first found stable
    stable_at: float = 0.0  # wall-clock time of the same moment, recorded in run timings
    next_check: float = 0.0
    force_generation: bool = False  # reprocess: run again even if this digest ran
    observed: bool = False  # the engine has looked at the folder at least once
    queued: bool = False  # stable, waiting for room in the pipeline
    transient: bool = False  # waiting for a transient condition to pass


@dataclass
class Engine:
    """Owns the queue of touched studies; the ledger records, the stages do the work."""

    config: Config
    models: Mapping[str, Model]
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.config.ledger_path)
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()
        self._stability = Stability()
        self._assembler = Assembler()
        #: digest of the listing each study had when it was last finished (kept in the
        #: ledger too): a touch (a full rescan, a restart) of an unchanged finished study
        #: costs one listing, no reading of its files
        self._finished: dict[tuple[str, str], bytes] = {}
        #: transient failures in a row per study (reset when it gets further)
        self._attempts: dict[tuple[str, str], int] = {}
        self._last_gateway = ""  # the gateway whose study ran last (round-robin start)
        self._runs_started = 0
        #: studies with a run in the pipeline, with their listing digest at the start
        self._in_flight: dict[tuple[str, str], bytes] = {}
        self.outbox = Outbox(self.config, self.ledger)
        self.outbox.on_done = self._send_done
        self._send_waiters: dict[int, requests.Request] = {}  # resend requests by send id
        #: reprocess requests with the latest run id of their study when they came
        self._reprocess_waiters: list[tuple[requests.Request, int]] = []
        self._pipeline = Pipeline(
            self.config.workers,
            self.config.output_dir,
            self.config.max_batch,
            self.config.batch_wait_seconds,
            tuple(sorted({type(model).__module__ for model in self.models.values()})),
            memory_mb=self.config.worker_memory_mb,
            run_timeout=self.config.run_timeout_seconds,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: remove temp files; sends left open become ``interrupted``,
        sends still queued are queued again, and runs left ``running`` resume when the
        scan touches their studies (all decided by the ledger's states alone)."""
        for root in (self.config.output_dir, self.config.state_dir):
            removed = sweep_temp_files(root)
            if removed:
                logger.warning("removed %d temporary file(s) left under %s", removed, root)
        requests.fail_interrupted(self.config.state_dir)
        recovery = self.ledger.recover()
        for send in recovery.queued:
            self.outbox.add(send)

    def start(self) -> None:
        """Start the pipeline's worker processes (else the first run starts them)."""
        self._pipeline.start()

    def touch(self, gateway_id: str, study_name: str, *, reprocess: bool = False) -> None:
        """Mark a study folder as touched (thread-safe; called by the watcher)."""
        now = time.monotonic()
        with self._lock:
            pending = self._pending.get((gateway_id, study_name))
            if pending is None:
                self._pending[(gateway_id, study_name)] = _Pending(
                    first_seen=now, force_generation=reprocess
                )
            else:
                pending.next_check = min(pending.next_check, now) if reprocess else 0.0
                pending.force_generation |= reprocess

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def queue(self) -> dict[str, int]:
        """What the heartbeat publishes: studies pending, runs in the pipeline, sends."""
        return {
            "pending": self.pending_count,
            "running": self._pipeline.in_flight,
            "sending": self.outbox.open_count + self.outbox.queued_count,
        }

    def tick(self, now: float | None = None) -> bool:
        """Look at every due touched study once; run at most one study per gateway.

        Gateways take turns (round-robin, starting after the gateway that ran last), so a
        flood of studies on one gateway cannot starve another. Returns True when a study
        ran: the caller should tick again at once rather than sleep. Raises
        :class:`LedgerUnavailable` when the service cannot go on.
        """
        now = time.monotonic() if now is None else now
        completed = self._complete_finished()
        room = self._pipeline.has_capacity
        busy = self.outbox.busy_studies()
        with self._lock:
            due = [
                (k, p)
                for k, p in self._pending.items()
                if (p.next_check <= now or (p.queued and room))
                and k not in self._in_flight
                and (k[0], k[1]) not in busy
            ]
        served: set[str] = set()
        for (gateway_id, study_name), pending in fair_order(due, self._last_gateway):
            if gateway_id in served:
                continue  # this gateway had its turn; its next study waits for the next tick
            runs_before = self._runs_started
            try:
                room = self._pipeline.has_capacity
                done = self._check(gateway_id, study_name, pending, now, room)
            except LedgerUnavailable:
                raise
            except Exception as exc:  # one study never stops the service
                done = self._contain(gateway_id, study_name, exc)
            if self._runs_started != runs_before:
                served.add(gateway_id)
                self._last_gateway = gateway_id
            if done:
                with self._lock:
                    if self._pending.get((gateway_id, study_name)) is pending:
                        del self._pending[(gateway_id, study_name)]
                self._stability.forget((gateway_id, study_name))
        completed += self._complete_finished()
        self._take_requests()
        return bool(served or completed)

    def _contain(self, gateway_id: str, study_name: str, exc: Exception) -> bool:
        """An unexpected error in one study's stage: logged with its traceback and recorded
        on the study (a bug, not a verdict on the study: it is looked at again when
        touched)."""
        name = printable(study_name)
        logger.exception("gateway=%s study=%s check failed", gateway_id, name)
        self.ledger.apply(
            Transition(gateway_id, study_name, events=[("ERROR", f"unexpected error: {exc!r}")])
        )
        return True

    def _take_requests(self) -> None:
        """Carry out the operators' requests (``STATE/requests``, :mod:`service.requests`);
        each is answered when its outcome is known: a resend when its send ends, a
        reprocess when the study's new run has ended (or nothing could run)."""
        state_dir = self.config.state_dir
        for req in requests.take_requests(state_dir):
            gid, suid = req.gateway_id, req.study_uid
            logger.info("gateway=%s study=%s %s requested", gid, suid, req.kind)
            if req.kind == "reprocess":
                last = max((r.run_id for r in self.ledger.runs(gid, suid)), default=0)
                self._reprocess_waiters.append((req, last))
                self.touch(gid, suid, reprocess=True)
                continue
            send_id = self.resend(gid, suid)
            if send_id is None:
                why = "no written results to send, or no destination configured for the gateway"
                requests.write_result(state_dir, req, False, "no_results", why)
            else:
                self._send_waiters[send_id] = req
        self._answer_reprocess()

    def _answer_reprocess(self) -> None:
        busy = self.outbox.busy_studies()
        waiting = []
        for req, last in self._reprocess_waiters:
            key = (req.gateway_id, req.study_uid)
            with self._lock:
                pending = key in self._pending
            if pending or key in self._in_flight or key in busy:
                waiting.append((req, last))
                continue
            runs = [r for r in self.ledger.runs(*key) if r.run_id > last]
            if not runs:
                state = self.ledger.study_state(*key)
                current = str(state[0]) if state else "unknown"
                why = "nothing ran: the study folder is missing, empty or not readable"
                requests.write_result(self.config.state_dir, req, False, current, why)
                continue
            run = runs[-1]
            ok = run.state in (RunState.WRITTEN, RunState.SENT)
            message = f"run {run.run_id} ({run.model_name}): {run.state}" + (
                f": {run.reason}" if run.reason else ""
            )
            requests.write_result(self.config.state_dir, req, ok, str(run.state), message)
        self._reprocess_waiters = waiting

    def _send_done(self, send: QueuedSend, state: SendState, reason: str) -> None:
        req = self._send_waiters.pop(send.send_id, None)
        if req is not None:
            ok = state in SENT_OK
            word = StudyState.SENT if ok else StudyState.SEND_FAILED
            requests.write_result(self.config.state_dir, req, ok, str(word), reason)

    # -- one study -------------------------------------------------------------------------

    def _set(self, gateway_id: str, study_uid: str, state: StudyState, reason: str = "") -> None:
        self.ledger.apply(Transition(gateway_id, study_uid, state, reason))

    def _wait_transient(
        self, key: tuple[str, str], study_uid: str, pending: _Pending, now: float, why: str
    ) -> bool:
        """A condition that may pass: the study waits, shows why, and is tried again."""
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        delay = retry_delay(attempt)
        reason = f"{why}; retry {attempt} in {delay:g} s"
        self.ledger.apply(
            Transition(key[0], study_uid, StudyState.WAITING, reason, events=[("WARNING", reason)])
        )
        pending.stable_since = None
        pending.queued = False
        pending.transient = True
        pending.next_check = now + delay
        return False

    def _check(
        self, gateway_id: str, study_name: str, pending: _Pending, now: float, room: bool = True
    ) -> bool:
        """Advance one study; True when it needs no more attention until touched again.

        Without ``room`` in the pipeline a study is still watched until it is stable (its
        quiet period runs meanwhile), then ``queued``: it is looked at again as soon as
        there is room, in the gateways' turn order."""
        pending.transient = False
        gw = self.config.gateway(gateway_id)
        study_uid = assembly.study_uid_from_folder(study_name)
        gateway_dir = self.config.input_dir / f"{GATEWAY_PREFIX}{gateway_id}"
        folder = gateway_dir / study_name
        key = (gateway_id, study_name)
        if study_uid is None or folder.is_symlink() or not is_within(folder, gateway_dir):
            logger.warning("gateway=%s ignoring unsafe study folder name", gateway_id)
            message = f"unsafe study folder name ignored: {printable(study_name)!r}"
            self.ledger.apply(Transition(gateway_id, "", events=[("WARNING", message)]))
            return True
        try:
            snap = assembly.snapshot(folder, self.config.input_dir)
        except TransientError as exc:
            return self._wait_transient(key, study_uid, pending, now, str(exc))
        if not snap:
            if not gateway_dir.is_dir():  # the gateway's folder (the mount) is away
                why = f"input folder {gateway_dir.name} is not reachable"
                return self._wait_transient(key, study_uid, pending, now, why)
            return True  # folder gone or empty: nothing to do until touched again
        listing = _listing_digest(snap)
        if not pending.force_generation and self._finished_listing(key) == listing:
            return True  # unchanged since it was finished (touched by a rescan or a restart)
        quiet = self._stability.observe(key, snap, now)
        if quiet < gw.stable_seconds:
            # 'receiving' for a new study or one seen changing; a re-touched finished study
            # keeps its state unless its files really change.
            if (pending.observed and quiet == 0.0) or self.ledger.study_state(
                gateway_id, study_uid
            ) is None:
                self._set(gateway_id, study_uid, StudyState.RECEIVING)
            pending.observed = True
            pending.stable_since = None
            pending.queued = False
            pending.next_check = now + min(1.0, gw.stable_seconds - quiet)
            return False
        if pending.stable_since is None:
            pending.stable_since = now
            pending.stable_at = time.time()
        if not room:
            if not pending.queued:
                message = "stable; queued until the pipeline has room"
                self._set(gateway_id, study_uid, StudyState.READY, message)
            pending.queued = True
            pending.next_check = now + RECHECK_SECONDS
            return False
        pending.queued = False
        study = self._assembler.assemble(
            gateway_id,
            study_uid,
            folder,
            snap,
            max_file_bytes=self.config.max_file_bytes,
            max_pixels=self.config.max_pixels,
            max_elements=self.config.max_elements,
        )
        if study.unreadable:
            first = study.unreadable[0]
            why = (
                f"{len(study.unreadable)} file(s) cannot be read now "
                f"({printable(first.path.name)}: {first.reason})"
            )
            return self._wait_transient(key, study_uid, pending, now, why)
        try:
            changed = study.incomplete and assembly.snapshot(folder, self.config.input_dir) != snap
        except TransientError as exc:
            return self._wait_transient(key, study_uid, pending, now, str(exc))
        if changed:
            # a file vanished or changed while being read: wait for a quiet listing again
            pending.stable_since = None
            pending.next_check = now + min(1.0, gw.stable_seconds)
            return False
        records = self._instance_records(study, snap)
        if not study.instances:
            self.ledger.apply(
                Transition(
                    gateway_id,
                    study_uid,
                    StudyState.SKIPPED,
                    "no usable DICOM instance in the study",
                    instances=records,
                    listing=listing,
                )
            )
            self._finished[key] = listing
            return True
        if study.refused:  # a verdict on the study's content: permanent, nothing runs
            logger.error("gateway=%s study=%s %s", gateway_id, study_uid, study.refused)
            self.ledger.apply(
                Transition(
                    gateway_id,
                    study_uid,
                    StudyState.FAILED,
                    study.refused,
                    instances=records,
                    events=[("ERROR", study.refused)],
                    listing=listing,
                )
            )
            self._finished[key] = listing
            return True
        self.ledger.apply(Transition(gateway_id, study_uid, instances=records))
        imagedb = ImageDb(gateway_dir / "image.db")
        expected = imagedb.expected_instances(study_uid)
        waited = now - pending.stable_since
        if expected is None and imagedb.transient and waited < gw.max_wait_seconds:
            self._set(gateway_id, study_uid, StudyState.WAITING, imagedb.last_error)
            pending.next_check = now + min(RECHECK_SECONDS, gw.max_wait_seconds - waited)
            return False
        events: list[tuple[str, str]] = []
        if expected is None and imagedb.path.exists():  # locked too long or corrupt: say so
            events.append(("WARNING", f"{imagedb.last_error}; using the files' own tags"))
        missing = (expected or set()) - study.sop_uids
        if missing:
            if waited < gw.max_wait_seconds:
                self._set(
                    gateway_id,
                    study_uid,
                    StudyState.WAITING,
                    f"image.db lists {len(missing)} instance(s) not on disk yet",
                )
                pending.next_check = now + min(RECHECK_SECONDS, gw.max_wait_seconds - waited)
                return False
            events.append(
                (
                    "WARNING",
                    f"ran with {len(study.instances)} instance(s); image.db lists "
                    f"{len(missing)} more that never arrived within {gw.max_wait_seconds:g} s",
                )
            )
        if events:
            self.ledger.apply(Transition(gateway_id, study_uid, events=events))
        done = self._route_and_run(study, pending, now, listing)
        if key in self._in_flight:  # its run started: the listing is finished when it ends
            self._in_flight[key] = listing
        return done

    def _finished_listing(self, key: tuple[str, str]) -> bytes | None:
        if key not in self._finished:
            stored = self.ledger.finished_listing(*key)
            if stored is None:
                return None
            self._finished[key] = stored
        return self._finished[key]

    def _instance_records(self, study: Study, snap: Snapshot) -> list[InstanceRecord]:
        def state(path: Path) -> FileState:
            rel = path.relative_to(study.folder).as_posix()
            return snap.get(rel) or FileState(0, 0)

        records = [
            InstanceRecord(
                str(inst.path),
                inst.size,
                state(inst.path).mtime_ns,
                inst.sha256,
                inst.sop_instance_uid,
                inst.series_instance_uid,
                inst.sop_class_uid,
            )
            for inst in study.instances
        ]
        incomplete = [Rejected(p, assembly.incomplete_reason(p)) for p in study.incomplete]
        logged = 0
        for rej in [*study.rejected, *incomplete]:
            st = state(rej.path)
            records.append(
                InstanceRecord(str(rej.path), st.size, st.mtime_ns, rejected_reason=rej.reason)
            )
            if rej.quarantine and (logged := logged + 1) <= MAX_REJECT_LOG_LINES:
                logger.warning(
                    "gateway=%s study=%s file %s rejected: %s",
                    study.gateway_id,
                    study.study_uid,
                    printable(rej.path.relative_to(study.folder).as_posix()),
                    rej.reason,
                )
        if logged > MAX_REJECT_LOG_LINES:
            logger.warning(
                "gateway=%s study=%s %d more file(s) rejected; reasons in the ledger",
                study.gateway_id,
                study.study_uid,
                logged - MAX_REJECT_LOG_LINES,
            )
        return records

    def _route_and_run(self, study: Study, pending: _Pending, now: float, listing: bytes) -> bool:
        gid, suid = study.gateway_id, study.study_uid
        gw = self.config.gateway(gid)
        digest = assembly.inputs_digest(study.instances)
        model, why_not = select_model(gw.rules, self.models, study)
        if model is None:
            existing = self.ledger.find_run(gid, suid, digest, "none", "-")
            new_run = None
            if existing is None:
                new_run = NewRun("none", "-", digest, len(study.instances), node=self._node)
            self.ledger.apply(
                Transition(
                    gid,
                    suid,
                    StudyState.SKIPPED,
                    why_not,
                    new_run=new_run,
                    run=RunState.SKIPPED if new_run else None,
                    listing=listing,
                )
            )
            self._finished[(gid, study.folder.name)] = listing
            return True
        readiness = model.ready()
        if not readiness.ok:
            self._set(gid, suid, StudyState.WAITING_MODEL, readiness.reason)
            pending.next_check = now + RECHECK_SECONDS
            return False
        existing = self.ledger.find_run(gid, suid, digest, model.name, model.version)
        if existing is not None and not pending.force_generation:
            if existing.state != RunState.RUNNING:
                # these inputs already ran with this model version: finished as they were
                self.ledger.apply(Transition(gid, suid, listing=listing))
                self._finished[(gid, study.folder.name)] = listing
                return True
            run_id, generation = existing.run_id, existing.generation  # interrupted: finish it
            logger.info("gateway=%s study=%s resuming run %d", gid, suid, run_id)
            self._set(gid, suid, StudyState.RUNNING, f"run {run_id} ({model.name}), resumed")
        else:
            generation = (
                self.ledger.next_generation(gid, suid, digest) if existing is not None else 0
            )
            applied = self.ledger.apply(
                Transition(
                    gid,
                    suid,
                    StudyState.RUNNING,
                    f"{model.name} {model.version}",
                    new_run=NewRun(
                        model.name,
                        model.version,
                        digest,
                        len(study.instances),
                        generation,
                        self._node,
                    ),
                    run_reason="",
                )
            )
            assert applied.run_id is not None
            run_id = applied.run_id
        pending.force_generation = False
        self.execute_run(run_id, study, model, digest, generation, stable_at=pending.stable_at)
        return True

    @property
    def _node(self) -> str:
        return str(getattr(self.config, "node_name", ""))

    # -- running, writing, sending -----------------------------------------------------------

    def execute_run(
        self,
        run_id: int,
        study: Study,
        model: Model,
        digest: str,
        generation: int,
        *,
        stable_at: float = 0.0,
    ) -> None:
        """Start ``model`` on ``study`` in the pipeline; :meth:`_complete` records the outcome.

        The run's timings record durations (``prepare_s``, ``forward_s``, ``build_s`` or
        ``model_s``, ``write_s``, ``gate_s``, the forward's ``batch`` size) and wall clock
        moments (epoch seconds): ``stable_at`` when the engine found the study quiet for
        ``stable_seconds`` (when known), ``started_at`` and ``written_at``; the send's own
        row has its end.
        """
        gid, suid = study.gateway_id, study.study_uid
        self._runs_started += 1
        uids = UidFactory(
            self.config.uid_root, gid, suid, digest, model.name, model.version, str(generation)
        )
        timings: dict[str, float] = {"started_at": time.time()}
        if stable_at:
            timings["stable_at"] = stable_at
        layout = self.config.gateway(gid).layout
        ctx = RunContext(uids=uids, run_id=run_id, started=datetime.now())
        self._in_flight[(gid, study.folder.name)] = b""
        self._pipeline.submit(PipelineJob(run_id, study, model, ctx, layout, timings))

    def _complete_finished(self) -> int:
        """Record every run and send finished since the last call; how many."""
        sends = self.outbox.pump()
        outcomes = self._pipeline.pump()
        for outcome in outcomes:
            job = outcome.job
            key = (job.study.gateway_id, job.study.folder.name)
            listing = self._in_flight.pop(key, b"")
            try:
                self._complete(outcome, key, listing)
            except LedgerUnavailable:
                raise
            except Exception as exc:  # one study never stops the service
                self._contain(key[0], job.study.study_uid, exc)
        return len(outcomes) + sends

    def _complete(self, outcome: Outcome, key: tuple[str, str], listing: bytes) -> None:
        job, done, timings = outcome.job, outcome.finished, outcome.timings
        run_id, gid, suid = job.run_id, job.study.gateway_id, job.study.study_uid
        if "model_s" not in timings:
            stages = ("prepare_s", "forward_s", "build_s")
            timings["model_s"] = sum(timings.get(k, 0.0) for k in stages)
        outputs = [
            OutputRecord(o.path, o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid)
            for o in done.written
        ]
        finished = listing or None
        if done.error and done.transient:
            # the run stays 'running' and resumes with the same output UIDs
            pending = _Pending(first_seen=time.monotonic())
            why = f"run {run_id}: {done.error}"
            self._wait_transient(key, suid, pending, time.monotonic(), why)
            with self._lock:
                self._pending.setdefault(key, pending)
            return
        self._attempts.pop(key, None)
        if finished is not None:
            self._finished[key] = finished
        if done.error:
            self.ledger.apply(
                Transition(
                    gid,
                    suid,
                    StudyState.FAILED,
                    done.error,
                    run_id=run_id,
                    run=RunState.FAILED,
                    timings=timings,
                    outputs=outputs,
                    events=[("ERROR", f"run {run_id} failed: {done.error}")],
                    listing=finished,
                )
            )
            return
        if not done.written:
            self.ledger.apply(
                Transition(
                    gid,
                    suid,
                    StudyState.SKIPPED,
                    "model produced no output",
                    run_id=run_id,
                    run=RunState.SKIPPED,
                    timings=timings,
                    findings=done.findings,
                    listing=finished,
                )
            )
            return
        if done.problems:
            for finding in done.problems:
                if finding.path.exists():
                    moved = quarantine_file(finding.path, self.config.quarantine_dir, gid)
                    logger.error(
                        "gateway=%s study=%s output %s quarantined to %s: %s",
                        gid,
                        suid,
                        finding.path.name,
                        moved,
                        finding.message,
                    )
            first = done.problems[0]
            reason = (
                f"conformance gate: {len(done.problems)} problem(s); "
                f"{first.path.name}: {first.message}"
            )
            self.ledger.apply(
                Transition(
                    gid,
                    suid,
                    StudyState.FAILED,
                    reason,
                    run_id=run_id,
                    run=RunState.FAILED,
                    timings=timings,
                    findings=done.findings,
                    outputs=outputs,
                    events=[("ERROR", f"run {run_id}: {reason}")],
                    listing=finished,
                )
            )
            return
        timings["written_at"] = time.time()
        destination = self.config.destination(gid)
        send = None
        if destination.enabled:
            send = SendChange(SendState.QUEUED, destination=describe(destination))
        else:
            logger.info("gateway=%s study=%s no destination configured", gid, suid)
        applied = self.ledger.apply(
            Transition(
                gid,
                suid,
                StudyState.WRITTEN,
                f"run {run_id}: {len(outputs)} object(s) written"
                + ("" if send else "; no destination configured"),
                run_id=run_id,
                run=RunState.WRITTEN,
                run_reason="",
                timings=timings,
                findings=done.findings,
                outputs=outputs,
                send=send,
                listing=finished,
            )
        )
        if applied.send_id is not None:
            self.outbox.add(QueuedSend(applied.send_id, run_id, gid, suid))

    def resend(self, gateway_id: str, study_uid: str) -> int | None:
        """Queue one new send attempt of the study's latest run with outputs; its send id,
        or None when there is nothing to send or no destination."""
        runs = [r for r in self.ledger.runs(gateway_id, study_uid) if self.ledger.outputs(r.run_id)]
        destination = self.config.destination(gateway_id)
        if not runs or not destination.enabled:
            return None
        run = runs[-1]
        applied = self.ledger.apply(
            Transition(
                gateway_id,
                study_uid,
                run_id=run.run_id,
                send=SendChange(SendState.QUEUED, destination=describe(destination), manual=True),
                events=[("INFO", f"resend of run {run.run_id} requested")],
            )
        )
        assert applied.send_id is not None
        self.outbox.add(QueuedSend(applied.send_id, run.run_id, gateway_id, study_uid, True))
        return applied.send_id

    # -- whole folders ---------------------------------------------------------------------

    def discover(self) -> list[str]:
        """Gateway ids present under INPUT now (recorded in the ledger)."""
        found: list[str] = []
        root = self.config.input_dir
        try:
            children = sorted(root.iterdir()) if root.is_dir() else []
        except OSError as exc:
            logger.warning("cannot list %s: %s", root, exc.strerror)
            return found
        for child in children:
            gid = child.name[len(GATEWAY_PREFIX) :]
            if (
                child.name.startswith(GATEWAY_PREFIX)
                and child.is_dir()
                and not child.is_symlink()
                and GATEWAY_ID_RE.match(gid)
            ):
                if self.ledger.add_gateway(gid, child):
                    logger.info("gateway=%s discovered", gid)
                found.append(gid)
        return found

    @property
    def busy(self) -> bool:
        """Whether runs are in the pipeline or sends queued or in progress."""
        return (
            self._pipeline.in_flight > 0
            or self.outbox.open_count > 0
            or self.outbox.queued_count > 0
        )

    def wait(self, timeout: float, stop: threading.Event | None = None) -> None:
        """Pause between ticks: until a run's stage or a send completes when some are in
        flight, else until ``timeout`` or ``stop``."""
        if self._pipeline.in_flight or self.outbox.open_count:
            self._pipeline.wait(timeout, self.outbox.futures())
        elif stop is not None:
            stop.wait(timeout)
        else:
            time.sleep(timeout)

    def drain(self, timeout: float, poll: float = 0.2, stop: threading.Event | None = None) -> bool:
        """Tick until no study is pending or running, ``timeout`` or ``stop``; True when
        drained. After ``stop`` the runs already started are still finished (within
        ``timeout``); no new one starts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            ran = self.tick()
            if self.pending_count == 0 and not self.busy:
                return True
            if not self.busy and self._only_transient():
                logger.warning("the studies left wait for a transient condition to pass")
                break
            if not ran:
                self.wait(min(poll, max(0.0, deadline - time.monotonic())), stop)
        self.finish_in_flight(deadline - time.monotonic())
        self._answer_reprocess()
        return self.pending_count == 0 and not self.busy

    def _only_transient(self) -> bool:
        with self._lock:
            return bool(self._pending) and all(p.transient for p in self._pending.values())

    def finish_in_flight(self, timeout: float) -> bool:
        """Complete the runs already in the pipeline, starting none; True when none is left.
        A run still unfinished at ``timeout`` stays ``running`` and resumes at the next start.
        Sends still open are aborted and recorded ``interrupted``; queued ones stay queued."""
        deadline = time.monotonic() + timeout
        while self._pipeline.in_flight and time.monotonic() < deadline:
            self._pipeline.wait(max(0.0, min(0.5, deadline - time.monotonic())))
            for outcome in self._pipeline.pump():
                key = (outcome.job.study.gateway_id, outcome.job.study.folder.name)
                self._complete(outcome, key, self._in_flight.pop(key, b""))
        self.outbox.cancel_all(max(1.0, deadline - time.monotonic()))
        return not self._pipeline.in_flight

    def close(self) -> None:
        """Stop workers and send threads; a send still open is recorded as interrupted at
        the next start."""
        self._pipeline.close()
        self.outbox.close()
        self.ledger.close()


def fair_order(
    due: Iterable[tuple[tuple[str, str], _Pending]], last_gateway: str = ""
) -> list[tuple[tuple[str, str], _Pending]]:
    """``due`` interleaved across gateways: one study of each gateway in turn.

    Gateways go in id order starting with the first one after ``last_gateway`` (the one
    that ran last), wrapping around; each gateway's studies keep their order (touch order).
    """
    queues: dict[str, list[tuple[tuple[str, str], _Pending]]] = {}
    for item in due:
        queues.setdefault(item[0][0], []).append(item)
    gateways = sorted(queues)
    start = next((i for i, g in enumerate(gateways) if g > last_gateway), 0)
    gateways = gateways[start:] + gateways[:start]
    ordered: list[tuple[tuple[str, str], _Pending]] = []
    for turn in range(max((len(q) for q in queues.values()), default=0)):
        ordered.extend(queues[g][turn] for g in gateways if turn < len(queues[g]))
    return ordered


def _listing_digest(snap: Snapshot) -> bytes:
    """A digest of a folder listing (paths, sizes, mtimes) to compare listings cheaply."""
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(snap):
        state = snap[rel]
        h.update(f"{rel}\0{state.size}\0{state.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.digest()
