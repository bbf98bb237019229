"""The gateway engine: schedules touched study folders through the stages.

Watcher events only mark a study as *touched*; on each tick the engine asks readiness
(quiet period on a monotonic clock, every file complete DICOM, image.db's instances present
or ``max_wait_seconds`` elapsed) whether a study is ready, routes it, starts its run in the
pipeline, records each stage's outcome as one ledger transition and hands written results
to the outbox, which makes the one send attempt. Conditions that may pass (I/O errors, a
mount that is away, a locked image.db, a full disk) make the study wait and be tried
again with a bounded backoff; only content problems end it.

On a PostgreSQL ledger shared by nodes the engine also holds leases: ``intake:<gateway>``
to watch a gateway (spread over the intake nodes), ``run:<run_id>`` to execute a run (its
outcome is recorded only while the lease is still held: fencing); every second, and at once
after a run completes when its last look found work, it claims as many runs whose lease ran
out as its pipeline has room for, and every second it records dead nodes' open sends
``interrupted``. Its heartbeat is written by a thread of its own (:class:`NodeBeat`) while
the service loop turns. Its roles (``service.roles``) say which of intake, run and send it
does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from service import assembly, requests
from service.config import GATEWAY_ID_RE, Config
from service.conformance import quarantine_file
from service.fsutil import sweep_temp_files
from service.ledger import (
    RUN_LEASE,
    Ledger,
    LedgerUnavailable,
    NewRun,
    QueuedSend,
    RunRow,
    SendChange,
    Transition,
    printable,
)
from service.models.base import Model, RunContext, select_model
from service.outbox import Outbox
from service.outbox import replay as replay_send_journal
from service.pipeline import Job as PipelineJob
from service.pipeline import Outcome, Pipeline
from service.readiness import (
    GATEWAY_PREFIX,
    RECHECK_SECONDS,
    Drop,
    Later,
    Readiness,
    Receiving,
    Refuse,
    Skip,
    Transient,
    Watch,
)
from service.record import describe, run_transition
from service.uids import UidFactory
from service.values import (
    FINAL_STUDY_STATES,
    SENT_OK,
    RunState,
    SendState,
    Study,
    StudyState,
)

logger = logging.getLogger(__name__)

#: First and longest wait before a study that hit a transient error is tried again.
RETRY_FIRST_SECONDS = 5.0
#: Seconds between this node's heartbeats in a PostgreSQL ledger (``status`` lists nodes).
NODE_HEARTBEAT_SECONDS = 10.0
#: Seconds between a node's looks for runs and sends to take over (PostgreSQL ledger).
CLAIM_SECONDS = 1.0
#: Seconds before a run this node claimed but could not execute is claimed here again.
CLAIM_RETRY_SECONDS = 30.0
#: The lease a node holds to watch and scan a gateway on a PostgreSQL ledger.
INTAKE_LEASE = "intake:{}"
RETRY_MAX_SECONDS = 300.0
#: A node beats while its service loop turned within this many ``run_lease_seconds``.
LOOP_ALIVE_LEASES = 2.0


def retry_delay(attempt: int) -> float:
    """Bounded exponential backoff: 5, 10, 20 … seconds, at most 300 (attempt ≥ 1)."""
    return float(min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, attempt - 1)))


@dataclass
class Engine:
    """Owns the queue of touched studies; the ledger records, the stages do the work."""

    config: Config
    models: Mapping[str, Model]
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.config.ledger_location, self.config.node_name)
        self._pending: dict[tuple[str, str], Watch] = {}
        self._lock = threading.Lock()
        self._readiness = Readiness(self.config, self.ledger.finished_listing)
        #: transient failures in a row per study (reset when it gets further)
        self._attempts: dict[tuple[str, str], int] = {}
        self._last_gateway = ""  # the gateway whose study ran last (round-robin start)
        self._runs_started = 0
        self._node_beat: float | None = None  # monotonic time of the last node heartbeat
        #: the node's heartbeat thread (``serve``): while it runs, the turn does not beat
        self.node_beat: NodeBeat | None = None
        #: PostgreSQL ledger: the gateways whose intake lease this node holds, each with the
        #: monotonic time its hold ends unless renewed; None (SQLite): every gateway is ours
        self._intake: dict[str, float] | None = {} if self.config.ledger else None
        self._intake_beat: float | None = None  # monotonic time of the last lease renewal
        self._gateways: list[str] = []  # the gateways found by the last discover()
        #: PostgreSQL ledger: the runs this node executes, by run id (their ``run:<id>``
        #: leases are renewed while they are in the pipeline); None on SQLite (no leases)
        self._runs: dict[int, tuple[str, str]] | None = {} if self.config.ledger else None
        self._runs_beat: float | None = None  # monotonic time of the last run lease renewal
        self._claim_beat: float | None = None  # monotonic time of the last look for work
        self._claim_found = False  # the last look for runs claimed some
        self._runs_done = 0  # runs completed here since the last look for runs
        #: runs claimed here that could not execute here, with when to try them again
        self._not_here: dict[int, float] = {}
        self.roles = frozenset(self.config.roles)
        #: called with the gateways whose intake this node has just taken (the service
        #: rescans INPUT then, so that their studies are touched here)
        self.on_intake_taken: Callable[[list[str]], None] | None = None
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
        """After a restart: remove temp files; the send outcomes kept in
        ``STATE/send-journal.json`` are recorded; sends left open become ``interrupted``,
        sends still queued are queued again, and runs left ``running`` resume when the
        scan touches their studies (all decided by the ledger's states alone)."""
        for root in (self.config.output_dir, self.config.state_dir):
            removed = sweep_temp_files(root)
            if removed:
                logger.warning("removed %d temporary file(s) left under %s", removed, root)
        requests.fail_interrupted(self.config.state_dir)
        # outcomes of sends that ended while the ledger was away: recorded, not interrupted
        replay_send_journal(self.ledger, self.config.state_dir)
        recovery = self.ledger.recover()
        for send in recovery.queued:
            self._queue_send(send)

    def start(self) -> None:
        """Start the pipeline's worker processes (else the first run starts them); none
        on a node without the ``run`` role."""
        if "run" in self.roles:
            self._pipeline.start()

    def _queue_send(self, send: QueuedSend) -> None:
        """Hand a queued send to the outbox (a node without the ``send`` role leaves it
        queued in the ledger for a node that has it)."""
        if "send" in self.roles:
            self.outbox.add(send)

    def touch(self, gateway_id: str, study_name: str, *, reprocess: bool = False) -> None:
        """Mark a study folder as touched (thread-safe; called by the watcher). On a
        PostgreSQL ledger a gateway whose intake lease another node holds is not ours: its
        touches are dropped (an operator's reprocess request still counts)."""
        now = time.monotonic()
        if not reprocess and not self.holds_intake(gateway_id, now):
            return
        with self._lock:
            pending = self._pending.get((gateway_id, study_name))
            if pending is None:
                self._pending[(gateway_id, study_name)] = Watch(
                    first_seen=now, force_generation=reprocess
                )
            else:
                pending.next_check = min(pending.next_check, now) if reprocess else 0.0
                pending.force_generation |= reprocess

    def is_pending(self, gateway_id: str, study_name: str) -> bool:
        """Whether the study still has work here (touched, or a run in the pipeline); the
        polling watcher lists such studies every pass, the others on a slower cadence."""
        key = (gateway_id, study_name)
        with self._lock:
            return key in self._pending or key in self._in_flight

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
        self._node_heartbeat()
        self._renew_intake()
        self._renew_runs()
        completed = self._complete_finished()
        self._take_over(now)
        room = self._pipeline.has_capacity
        busy = self.outbox.busy_studies()
        with self._lock:
            due = [
                (k, p)
                for k, p in self._pending.items()
                if (p.next_check <= now or (p.queued and room))
                and k not in self._in_flight
                and (k[0], k[1]) not in busy
                and (self.holds_intake(k[0]) or p.force_generation)
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
                self._readiness.forget((gateway_id, study_name))
                if (gateway_id, study_name) not in self._in_flight:
                    self._attempts.pop((gateway_id, study_name), None)
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
        self,
        key: tuple[str, str],
        study_uid: str,
        pending: Watch,
        now: float,
        why: str,
        run_id: int | None = None,
    ) -> bool:
        """A condition that may pass: the study waits, shows why, and is tried again.
        ``run_id``: the run it cut short (PostgreSQL: recorded only while this node holds
        the run's lease, which it keeps without renewing: another node may take the run
        over once it runs out). False (not done); fenced off, nothing is recorded and
        ``pending`` is left as it was (``pending.transient`` stays False)."""
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        delay = retry_delay(attempt)
        reason = f"{why}; retry {attempt} in {delay:g} s"
        fenced = run_id is not None and self._runs is not None
        applied = self.ledger.apply(
            Transition(
                key[0],
                study_uid,
                StudyState.WAITING,
                reason,
                run_id=run_id if fenced else None,
                events=[("WARNING", reason)],
                fence=RUN_LEASE.format(run_id) if fenced else "",
                keep_lease=True,
            )
        )
        if applied.discarded:
            return False
        pending.stable_since = None
        pending.queued = False
        pending.transient = True
        pending.next_check = now + delay
        return False

    def _check(
        self, gateway_id: str, study_name: str, watch: Watch, now: float, room: bool = True
    ) -> bool:
        """Advance one study by the readiness verdict; True when it needs no more attention
        until touched again."""
        watch.transient = False
        key = (gateway_id, study_name)
        verdict = self._readiness.look(gateway_id, study_name, watch, now, room)
        if isinstance(verdict, Drop):
            if verdict.event:
                self.ledger.apply(Transition(gateway_id, "", events=[("WARNING", verdict.event)]))
            return True
        if isinstance(verdict, Transient):
            state = self.ledger.study_state(gateway_id, study_name)
            if state is not None and state[0] in FINAL_STUDY_STATES | {StudyState.WRITTEN}:
                # a finished study that cannot be looked at now (mount away): its outcome
                # stands; it is looked at again after the backoff, its state unchanged
                attempt = self._attempts.get(key, 0) + 1
                self._attempts[key] = attempt
                watch.transient = True
                watch.next_check = now + retry_delay(attempt)
                return False
            return self._wait_transient(key, study_name, watch, now, verdict.reason)
        if isinstance(verdict, Receiving):
            # 'receiving' for a new study or one seen changing; a re-touched finished study
            # keeps its state unless its files really change
            if verdict.changed or self.ledger.study_state(gateway_id, study_name) is None:
                self._set(gateway_id, study_name, StudyState.RECEIVING)
            watch.next_check = verdict.next_check
            return False
        if isinstance(verdict, Later):
            if verdict.state is not None:
                self._set(gateway_id, study_name, verdict.state, verdict.reason)
            watch.next_check = verdict.next_check
            return False
        if isinstance(verdict, Skip):
            self.ledger.apply(
                Transition(
                    gateway_id,
                    study_name,
                    StudyState.SKIPPED,
                    verdict.reason,
                    instances=verdict.records,
                    listing=verdict.listing,
                )
            )
            self._readiness.finished(key, verdict.listing)
            return True
        if isinstance(verdict, Refuse):  # a verdict on the study's content: nothing runs
            logger.error("gateway=%s study=%s %s", gateway_id, study_name, verdict.reason)
            self.ledger.apply(
                Transition(
                    gateway_id,
                    study_name,
                    StudyState.FAILED,
                    verdict.reason,
                    instances=verdict.records,
                    events=[("ERROR", verdict.reason)],
                    listing=verdict.listing,
                )
            )
            self._readiness.finished(key, verdict.listing)
            return True
        self.ledger.apply(
            Transition(gateway_id, study_name, instances=verdict.records, events=verdict.events)
        )
        done = self._route_and_run(verdict.study, watch, now, verdict.listing)
        if key in self._in_flight:  # its run started: the listing is finished when it ends
            self._in_flight[key] = verdict.listing
        return done

    def _route_and_run(self, study: Study, pending: Watch, now: float, listing: bytes) -> bool:
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
            self._readiness.finished((gid, study.folder.name), listing)
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
                self._readiness.finished((gid, study.folder.name), listing)
                return True
            run_id, generation = existing.run_id, existing.generation  # interrupted: finish it
            if not self._lease_run(run_id):
                return True  # another node executes it (or recorded its outcome)
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
            if not self._lease_run(run_id):
                pending.force_generation = False
                return True  # another node claimed it first: it executes it
        pending.force_generation = False
        self.execute_run(run_id, study, model, digest, generation, stable_at=pending.stable_at)
        return True

    def _lease_run(self, run_id: int) -> bool:
        """PostgreSQL ledger: take the lease ``run:<run_id>`` (the run still ``running``,
        no other node holding it); True when this node may execute the run (never without
        the ``run`` role: the run stays ``running`` for a node that has it). Always True
        on SQLite."""
        if self._runs is None:
            return True
        if "run" not in self.roles or run_id in self._runs:
            return False  # no run role, or it is in this node's pipeline already
        if not self.ledger.claim_run(run_id, self._node, self.config.run_lease_seconds):
            logger.info("run %d is executed by another node", run_id)
            return False
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
        if self._runs is not None:
            self._runs[run_id] = (gid, suid)
        self._pipeline.submit(PipelineJob(run_id, study, model, ctx, layout, timings))

    def _complete_finished(self) -> int:
        """Record every run and send finished since the last call; how many."""
        sends = self.outbox.pump()
        outcomes = self._pipeline.pump()
        self._runs_done += len(outcomes)
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
        """Record a run that ended: a transient failure waits and is tried again (the run
        stays ``running`` and resumes with the same output UIDs); anything else is one
        transition (:func:`service.record.run_transition`)."""
        job, done = outcome.job, outcome.finished
        run_id, gid, suid = job.run_id, job.study.gateway_id, job.study.study_uid
        fence = ""
        if self._runs is not None:  # PostgreSQL: recorded only while the lease is ours
            self._runs.pop(run_id, None)
            fence = RUN_LEASE.format(run_id)
        if done.error and done.transient:
            watch = Watch(first_seen=time.monotonic())
            why = f"run {run_id}: {done.error}"
            self._wait_transient(key, suid, watch, time.monotonic(), why, run_id)
            if watch.transient is False:  # fenced off: another node took the run over
                return
            with self._lock:
                self._pending.setdefault(key, watch)
            return
        self._attempts.pop(key, None)
        if not done.error:
            for finding in done.problems:  # the gate failed: nothing of the run leaves
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
        destination = self.config.destination(gid)
        transition = run_transition(
            gid, suid, run_id, done, outcome.timings, listing or None, destination
        )
        applied = self.ledger.apply(replace(transition, fence=fence))
        if applied.discarded:  # another node took the run over: its outcome stands
            return
        if listing:
            self._readiness.finished(key, listing)
        if applied.send_id is not None:
            self._queue_send(QueuedSend(applied.send_id, run_id, gid, suid))

    def resend(self, gateway_id: str, study_uid: str) -> int | None:
        """Queue one new send attempt of the study's latest run whose outputs passed the
        gate (written or sent before); its send id, or None when there is nothing to send
        or no destination."""
        sendable = (RunState.WRITTEN, RunState.SENDING, RunState.SENT, RunState.SEND_FAILED)
        runs = [
            r
            for r in self.ledger.runs(gateway_id, study_uid)
            if r.state in sendable and self.ledger.outputs(r.run_id)
        ]
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
        self._queue_send(QueuedSend(applied.send_id, run.run_id, gateway_id, study_uid, True))
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
        self._gateways = found
        self._renew_intake(force=True)
        return found

    # -- intake leases (PostgreSQL ledger: one node watches a gateway) -----------------------

    def holds_intake(self, gateway_id: str, now: float | None = None) -> bool:
        """Whether this node does the gateway's intake: always on SQLite; on PostgreSQL
        while its ``intake:<gateway_id>`` lease, as last renewed, has not run out (counted
        from before the renewal, so never later than the database's own expiry)."""
        if self._intake is None:
            return True
        until = self._intake.get(gateway_id)
        return until is not None and (time.monotonic() if now is None else now) < until

    def _renew_intake(self, *, force: bool = False) -> None:
        """Take or renew intake leases, every third of ``intake_lease_seconds`` (at most
        every :data:`NODE_HEARTBEAT_SECONDS`): this node renews those it holds and takes
        free ones while it holds fewer than ceil(gateways / live intake nodes) (live: a
        heartbeat within the lease); it gives up those beyond that share, so that the
        gateways spread over the intake nodes. A gateway newly taken is rescanned
        (``on_intake_taken``); one lost or given up stops its intake here: its touched
        studies are dropped, its runs and sends in progress finish. Nothing without the
        ``intake`` role."""
        if self._intake is None or "intake" not in self.roles:
            return
        lease = self.config.intake_lease_seconds
        start = time.monotonic()
        every = min(NODE_HEARTBEAT_SECONDS, lease / 3)
        if not force and self._intake_beat is not None and start - self._intake_beat < every:
            return
        self._intake_beat = start
        node = self.config.node_name
        self._node_heartbeat()  # counted among the live intake nodes before sharing
        live = set(self.ledger.live_nodes("intake", lease)) | {node}
        share = math.ceil(len(self._gateways) / len(live))
        held = sorted(g for g in self._gateways if self.holds_intake(g, start))
        for gid in held[share:]:  # more than a fair share: the others take these
            self.ledger.release_lease(INTAKE_LEASE.format(gid), node)
            self._intake.pop(gid, None)
            logger.info("gateway=%s intake given up: %d live intake nodes share it", gid, len(live))
        taken: list[str] = []
        for gid in self._gateways:
            held_before = self.holds_intake(gid, start)
            if not held_before and sum(map(self.holds_intake, self._gateways)) >= share:
                continue  # a fair share held: a free gateway is left to another node
            if self.ledger.take_lease(INTAKE_LEASE.format(gid), node, lease):
                self._intake[gid] = start + lease
                if not held_before:
                    logger.info("gateway=%s intake taken (lease %g s)", gid, lease)
                    taken.append(gid)
            elif self._intake.pop(gid, None) is not None:
                logger.warning("gateway=%s intake lease lost: another node took it", gid)
        for gid in list(self._intake):
            if not self.holds_intake(gid, start) or gid not in self._gateways:
                del self._intake[gid]
        with self._lock:
            for key in [k for k, p in self._pending.items() if not p.force_generation]:
                if not self.holds_intake(key[0], start):
                    del self._pending[key]
        if taken and self.on_intake_taken is not None:
            self.on_intake_taken(taken)

    # -- taking work over (PostgreSQL ledger: any node with the role) ------------------------

    def _take_over(self, now: float) -> None:
        """Every :data:`CLAIM_SECONDS`: record the sends of dead nodes ``interrupted``;
        with the ``send`` role, adopt the sends queued by any node. With the ``run`` role,
        claim runs left ``running`` without a live lease (a dead or stalled node's, or
        recorded by an intake-only node), oldest first, as many as the pipeline has room
        for (batches included): every :data:`CLAIM_SECONDS`, and at once after a run
        completed here when the last look found work (a look that finds none is a read)."""
        if self._runs is None:
            return
        due = self._claim_beat is None or now - self._claim_beat >= CLAIM_SECONDS
        if due:
            self._claim_beat = now
            self.ledger.interrupt_dead_sends(self.config.run_lease_seconds)
            if "send" in self.roles:
                self.outbox.adopt(self.ledger.queued_sends())
        if "run" not in self.roles:
            return
        if not due and not (self._claim_found and self._runs_done):
            return
        room = self._pipeline.room
        if room <= 0:
            return  # full: looked at again when a run completes
        self._runs_done = 0
        self._not_here = {k: t for k, t in self._not_here.items() if t > now}
        exclude = sorted({*self._runs, *self._not_here})
        claimed = self.ledger.claim_runs(
            self._node, self.config.run_lease_seconds, room, exclude=exclude
        )
        self._claim_found = bool(claimed)
        for run in claimed:
            why = self._resume_claimed(run)
            if why:
                logger.info(
                    "gateway=%s study=%s run %d not executed here: %s",
                    run.gateway_id,
                    printable(run.study_uid),
                    run.run_id,
                    why,
                )
                self._not_here[run.run_id] = now + CLAIM_RETRY_SECONDS
                self.ledger.release_lease(RUN_LEASE.format(run.run_id), self._node)

    def _resume_claimed(self, run: RunRow) -> str:
        """Execute a claimed run on its study folder as it is now, with the same
        generation (so the same output UIDs); why not ("" when it started)."""
        gid, folder = run.gateway_id, run.study_uid
        model = self.models.get(run.model_name)
        if model is None or model.version != run.model_version:
            return f"model {run.model_name} {run.model_version} is not loaded on this node"
        readiness = model.ready()
        if not readiness.ok:
            return f"model {run.model_name} is not ready: {readiness.reason}"
        if (gid, folder) in self._in_flight:
            return "its study has a run in the pipeline here"
        rebuilt = self._readiness.rebuild(gid, folder)
        if isinstance(rebuilt, str):
            return rebuilt
        study, listing = rebuilt
        digest = assembly.inputs_digest(study.instances)
        if digest != run.inputs_digest:
            return "its inputs changed since it started: intake runs them anew"
        logger.info(
            "gateway=%s study=%s run %d taken over (started by node %s)",
            gid,
            printable(study.study_uid),
            run.run_id,
            run.node or "?",
        )
        self._set(
            gid,
            study.study_uid,
            StudyState.RUNNING,
            f"run {run.run_id} ({model.name}), taken over by node {self._node}",
        )
        self.execute_run(run.run_id, study, model, digest, run.generation)
        self._in_flight[(gid, study.folder.name)] = listing
        return ""

    def _renew_runs(self) -> None:
        """Renew the lease of every run this node executes, every third of
        ``run_lease_seconds``. A lease lost (another node took the run over while this
        one stalled) is logged; that run's outcome will be discarded here."""
        if not self._runs:
            return
        lease = self.config.run_lease_seconds
        now = time.monotonic()
        if self._runs_beat is not None and now - self._runs_beat < lease / 3:
            return
        self._runs_beat = now
        for run_id, (gid, suid) in list(self._runs.items()):
            if not self.ledger.renew_lease(RUN_LEASE.format(run_id), self._node, lease):
                logger.warning(
                    "gateway=%s study=%s run %d: lease lost (another node took the run over);"
                    " its outcome here will be discarded",
                    gid,
                    printable(suid),
                    run_id,
                )

    def _release_intake(self) -> None:
        """Give the intake leases up at a clean stop, so another node takes them at once."""
        if not self._intake:
            return
        for gid in list(self._intake):
            with contextlib.suppress(LedgerUnavailable):
                self.ledger.release_lease(INTAKE_LEASE.format(gid), self.config.node_name)
        self._intake.clear()

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
        self.outbox.stop_opening()
        while self._pipeline.in_flight and time.monotonic() < deadline:
            self._pipeline.wait(max(0.0, min(0.5, deadline - time.monotonic())))
            self._complete_finished()
        self.outbox.cancel_all(max(1.0, deadline - time.monotonic()))
        return not self._pipeline.in_flight

    def start_node_beat(self, loop_age: Callable[[], float]) -> None:
        """PostgreSQL ledger: beat from a thread of its own (:class:`NodeBeat`), so that a
        long turn of the engine does not make this node look gone; ``loop_age`` is the
        seconds since the service loop last turned (a dead loop stops the beating)."""
        if self.config.ledger and self.node_beat is None:
            self.node_beat = NodeBeat(self.config, loop_age)
            self.node_beat.start()

    def _node_heartbeat(self) -> None:
        """In a PostgreSQL ledger (shared by nodes): record this node alive, every
        :func:`node_beat_seconds` (a node whose heartbeat is older than
        ``run_lease_seconds`` counts as gone: its open sends are recorded interrupted),
        here in the turn only when no :class:`NodeBeat` thread beats (``--once``, tests).
        (An SQLite ledger has one node: nothing to say.)"""
        if self.node_beat is not None and self.node_beat.is_alive():
            return
        beat = time.monotonic()
        every = node_beat_seconds(self.config)
        if self.config.ledger and (self._node_beat is None or beat - self._node_beat >= every):
            self.ledger.heartbeat(self.config.node_name, tuple(self.config.roles))
            self._node_beat = beat

    def close(self) -> None:
        """Stop workers and send threads; a send still open is recorded as interrupted at
        the next start."""
        if self.node_beat is not None:
            self.node_beat.stop()
        self._pipeline.close()
        self.outbox.close()
        self._release_intake()
        for run_id in list(self._runs or ()):  # unfinished: another node may take them now
            with contextlib.suppress(LedgerUnavailable):
                self.ledger.release_lease(RUN_LEASE.format(run_id), self._node)
        self.ledger.close()


def node_beat_seconds(config: Config) -> float:
    """Seconds between a node's heartbeats: :data:`NODE_HEARTBEAT_SECONDS`, and a third
    of the leases at most."""
    return min(
        NODE_HEARTBEAT_SECONDS, config.run_lease_seconds / 3, config.intake_lease_seconds / 3
    )


class NodeBeat:
    """A node's heartbeat in a PostgreSQL ledger, written by a thread of its own through a
    ledger connection of its own (a :class:`Ledger` serialises its one connection), every
    :func:`node_beat_seconds`, while the service loop is alive: ``loop_age()`` (seconds
    since the loop's last turn) at most :data:`LOOP_ALIVE_LEASES` × ``run_lease_seconds``.
    A loop stuck longer, or dead, leaves the heartbeat to age: other nodes then take the
    node for gone. A ledger that cannot be reached is tried again at the next beat."""

    def __init__(self, config: Config, loop_age: Callable[[], float]) -> None:
        self.config = config
        self.loop_age = loop_age
        self.every = node_beat_seconds(config)
        self.beats = 0  # heartbeats written (tests, logs)
        self._stop = threading.Event()
        self._ledger: Ledger | None = None
        self._thread = threading.Thread(target=self._run, name="node-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def beat(self) -> bool:
        """One heartbeat now if the loop is alive; whether it was written."""
        age = self.loop_age()
        limit = LOOP_ALIVE_LEASES * self.config.run_lease_seconds
        if age > limit:
            logger.warning(
                "node %s: the service loop has not turned for %.0f s (over %.0f s):"
                " no heartbeat, other nodes will take this node for gone",
                self.config.node_name,
                age,
                limit,
            )
            return False
        try:
            if self._ledger is None:
                self._ledger = Ledger(self.config.ledger_location, self.config.node_name)
            self._ledger.heartbeat(self.config.node_name, tuple(self.config.roles))
        except LedgerUnavailable as exc:
            logger.warning("node %s: heartbeat not written: %s", self.config.node_name, exc)
            return False
        self.beats += 1
        return True

    def _run(self) -> None:
        try:
            while True:
                self.beat()
                if self._stop.wait(self.every):
                    return
        except Exception:  # a bug: the heartbeat ages, other nodes take this node for gone
            logger.exception("node %s: the heartbeat thread failed", self.config.node_name)
        finally:
            if self._ledger is not None:
                with contextlib.suppress(Exception):
                    self._ledger.close()

    def stop(self) -> None:
        """Stop beating (the service stops); returns when the thread has ended."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.every + 5.0)


def fair_order(
    due: Iterable[tuple[tuple[str, str], Watch]], last_gateway: str = ""
) -> list[tuple[tuple[str, str], Watch]]:
    """``due`` interleaved across gateways: one study of each gateway in turn.

    Gateways go in id order starting with the first one after ``last_gateway`` (the one
    that ran last), wrapping around; each gateway's studies keep their order (touch order).
    """
    queues: dict[str, list[tuple[tuple[str, str], Watch]]] = {}
    for item in due:
        queues.setdefault(item[0][0], []).append(item)
    gateways = sorted(queues)
    start = next((i for i, g in enumerate(gateways) if g > last_gateway), 0)
    gateways = gateways[start:] + gateways[:start]
    ordered: list[tuple[tuple[str, str], Watch]] = []
    for turn in range(max((len(q) for q in queues.values()), default=0)):
        ordered.extend(queues[g][turn] for g in gateways if turn < len(queues[g]))
    return ordered
