"""The gateway engine: from touched study folders to runs, outputs and sends.

Watcher events only mark a study as *touched*; on each tick the engine decides with the
completeness rule (quiet period on a monotonic clock, every file complete DICOM, image.db's
instances present or ``max_wait_seconds`` elapsed) whether a study is ready, then runs the
routed model exactly once per (gateway, study, inputs digest, model version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from service import assembly
from service.assembly import Assembler, Rejected, Stability, Study
from service.config import GATEWAY_ID_RE, Config
from service.conformance import Finding, quarantine_file
from service.errors import ConfigError
from service.fsutil import atomic_write, is_within, sweep_temp_files
from service.imagedb import ImageDb
from service.ledger import InstanceRecord, Ledger, RunState, StudyState
from service.models.base import Model, RunContext, select_model
from service.pipeline import Job, Outcome, Pipeline
from service.sender import SendResult, SendStatus
from service.uids import UidFactory

logger = logging.getLogger(__name__)

GATEWAY_PREFIX = "gateway_"
HEARTBEAT_NAME = "heartbeat"
REQUESTS_DIR = "requests"
#: Seconds between re-checks of a study waiting for a model or for image.db's instances.
RECHECK_SECONDS = 5.0
#: Associations that may be open at once (sends of different runs).
SEND_THREADS = 4
#: Rejected files logged one by one per study check; the rest are counted in one line.
MAX_REJECT_LOG_LINES = 20


@dataclass
class _Pending:
    first_seen: float
    stable_since: float | None = None  # monotonic time the study was first found stable
    stable_at: float = 0.0  # wall-clock time of the same moment, recorded in run timings
    next_check: float = 0.0
    force_generation: bool = False  # reprocess: run again even if this digest ran
    observed: bool = False  # the engine has looked at the folder at least once
    queued: bool = False  # stable, waiting for room in the pipeline


@dataclass
class _Send:
    """A send in progress on a send thread."""

    run_id: int
    gateway_id: str
    study_uid: str
    send_id: int
    future: Future[SendResult] = field(init=False)


@dataclass
class Engine:
    """Owns the ledger, the models and the queue of touched studies."""

    config: Config
    models: Mapping[str, Model]
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.config.ledger_path)
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()
        self._stability = Stability()
        self._assembler = Assembler()
        self._last_heartbeat = 0.0
        self._last_beat: dict[str, int] = {}
        #: digest of the listing each study had when it was last finished (kept in the
        #: ledger too): a touch (a full rescan, a restart) of an unchanged finished study
        #: costs one listing, no reading of its files
        self._finished: dict[tuple[str, str], bytes] = {}
        self._last_gateway = ""  # the gateway whose study ran last (round-robin start)
        self._runs_started = 0
        #: studies with a run in the pipeline, with their listing digest at the start
        self._in_flight: dict[tuple[str, str], bytes] = {}
        self._sends: list[_Send] = []
        self._send_pool = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="send")
        self._pipeline = Pipeline(
            self.config.workers,
            self.config.output_dir,
            self.config.max_batch,
            self.config.batch_wait_seconds,
            tuple(sorted({type(model).__module__ for model in self.models.values()})),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: remove temp files, mark interrupted sends; interrupted runs
        resume when the scan touches their studies."""
        for root in (self.config.output_dir, self.config.state_dir):
            removed = sweep_temp_files(root)
            if removed:
                logger.warning("removed %d temporary file(s) left under %s", removed, root)
        self.ledger.forget_listings_of_interrupted_runs()
        for send in self.ledger.interrupted_sends():
            run = self.ledger.get_run(send["run_id"])
            self.ledger.finish_send(send["send_id"], "interrupted", "service stopped during send")
            if run is not None:
                reason = "send interrupted by a stop; use `resend` to try again"
                self.ledger.set_run_state(run.run_id, RunState.SEND_FAILED, reason)
                self.ledger.set_study_state(
                    run.gateway_id, run.study_uid, StudyState.SEND_FAILED, reason
                )

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
                pending.next_check = 0.0
                pending.force_generation |= reprocess

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def tick(self, now: float | None = None) -> bool:
        """Look at every due touched study once; run at most one study per gateway.

        Gateways take turns (round-robin, starting after the gateway that ran last), so a
        flood of studies on one gateway cannot starve another. Returns True when a study
        ran: the caller should tick again at once rather than sleep.
        """
        now = time.monotonic() if now is None else now
        completed = self._complete_finished()
        room = self._pipeline.has_capacity
        with self._lock:
            due = [
                (k, p)
                for k, p in self._pending.items()
                if (p.next_check <= now or (p.queued and room)) and k not in self._in_flight
            ]
        served: set[str] = set()
        for (gateway_id, study_name), pending in fair_order(due, self._last_gateway):
            if gateway_id in served:
                continue  # this gateway had its turn; its next study waits for the next tick
            runs_before = self._runs_started
            try:
                room = self._pipeline.has_capacity
                done = self._check(gateway_id, study_name, pending, now, room)
            except Exception as exc:  # one study never stops the service
                logger.exception("gateway=%s study=%s check failed", gateway_id, study_name)
                self.ledger.event(gateway_id, study_name, "ERROR", f"unexpected error: {exc}")
                done = True
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
        self._heartbeat()
        return bool(served or completed)

    def _take_requests(self) -> None:
        """Pick up ``reprocess`` requests written by the CLI into ``STATE/requests``."""
        folder = self.config.state_dir / REQUESTS_DIR
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            gateway_id, _, study_uid = path.name.partition("__")
            path.unlink(missing_ok=True)
            if GATEWAY_ID_RE.match(gateway_id) and assembly.study_uid_from_folder(study_uid):
                logger.info("gateway=%s study=%s reprocess requested", gateway_id, study_uid)
                self.touch(gateway_id, study_uid, reprocess=True)

    def _heartbeat(self) -> None:
        """``STATE/heartbeat`` every 5 s and when the queue empties: its mtime is the
        liveness signal (``status --health``), its content the queue (studies pending,
        runs in the pipeline, sends open)."""
        beat = {
            "pending": self.pending_count,
            "running": self._pipeline.in_flight,
            "sending": len(self._sends),
        }
        emptied = not any(beat.values()) and beat != self._last_beat
        if time.monotonic() - self._last_heartbeat < 5.0 and not emptied:
            return
        self._last_heartbeat, self._last_beat = time.monotonic(), beat
        data = json.dumps(beat).encode()
        atomic_write(self.config.state_dir / HEARTBEAT_NAME, lambda fh: fh.write(data))

    # -- one study -------------------------------------------------------------------------

    def _check(
        self, gateway_id: str, study_name: str, pending: _Pending, now: float, room: bool = True
    ) -> bool:
        """Advance one study; True when it needs no more attention until touched again.

        Without ``room`` in the pipeline a study is still watched until it is stable (its
        quiet period runs meanwhile), then ``queued``: it is looked at again as soon as
        there is room, in the gateways' turn order."""
        gw = self.config.gateway(gateway_id)
        study_uid = assembly.study_uid_from_folder(study_name)
        gateway_dir = self.config.input_dir / f"{GATEWAY_PREFIX}{gateway_id}"
        folder = gateway_dir / study_name
        if study_uid is None or folder.is_symlink() or not is_within(folder, gateway_dir):
            logger.warning("gateway=%s ignoring unsafe study folder name", gateway_id)
            self.ledger.event(gateway_id, "", "WARNING", "unsafe study folder name ignored")
            return True
        snap = assembly.snapshot(folder, self.config.input_dir)
        if not snap:
            return True  # folder gone or empty: nothing to do until touched again
        key = (gateway_id, study_name)
        listing = _listing_digest(snap)
        if not pending.force_generation and self._finished_listing(key) == listing:
            return True  # unchanged since it was finished (touched by a rescan or a restart)
        quiet = self._stability.observe((gateway_id, study_name), snap, now)
        if quiet < gw.stable_seconds:
            # 'receiving' for a new study or one seen changing; a re-touched finished study
            # keeps its state unless its files really change.
            if (pending.observed and quiet == 0.0) or self.ledger.study_state(
                gateway_id, study_uid
            ) is None:
                self.ledger.set_study_state(gateway_id, study_uid, StudyState.RECEIVING)
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
                self.ledger.set_study_state(gateway_id, study_uid, StudyState.READY, message)
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
        )
        if study.incomplete and assembly.snapshot(folder, self.config.input_dir) != snap:
            # a file vanished or changed while being read: wait for a quiet listing again
            pending.stable_since = None
            pending.next_check = now + min(1.0, gw.stable_seconds)
            return False
        self._record_instances(study, snap)
        if not study.instances:
            self.ledger.set_study_state(
                gateway_id, study_uid, StudyState.SKIPPED, "no usable DICOM instance in the study"
            )
            self._mark_finished(key, listing)
            return True
        imagedb = ImageDb(gateway_dir / "image.db")
        expected = imagedb.expected_instances(study_uid)
        if expected is None and imagedb.path.exists():  # locked or corrupt: say so
            message = f"{imagedb.last_error}; using the files' own tags"
            self.ledger.event(gateway_id, study_uid, "WARNING", message)
        missing = (expected or set()) - study.sop_uids
        if missing:
            waited = now - pending.stable_since
            if waited < gw.max_wait_seconds:
                self.ledger.set_study_state(
                    gateway_id,
                    study_uid,
                    StudyState.WAITING,
                    f"image.db lists {len(missing)} instance(s) not on disk yet",
                )
                pending.next_check = now + min(RECHECK_SECONDS, gw.max_wait_seconds - waited)
                return False
            self.ledger.event(
                gateway_id,
                study_uid,
                "WARNING",
                f"ran with {len(study.instances)} instance(s); image.db lists {len(missing)} "
                f"more that never arrived within {gw.max_wait_seconds:g} s",
            )
        done = self._route_and_run(study, pending, now)
        if key in self._in_flight:  # its run started: the listing is finished when it ends
            self._in_flight[key] = listing
        elif done:
            self._mark_finished(key, listing)
        return done

    def _finished_listing(self, key: tuple[str, str]) -> bytes | None:
        if key not in self._finished:
            stored = self.ledger.finished_listing(*key)
            if stored is None:
                return None
            self._finished[key] = stored
        return self._finished[key]

    def _mark_finished(self, key: tuple[str, str], listing: bytes) -> None:
        self._finished[key] = listing
        self.ledger.set_finished_listing(*key, listing)

    def _record_instances(self, study: Study, snap: assembly.Snapshot) -> None:
        def state(path: Path) -> assembly.FileState:
            rel = path.relative_to(study.folder).as_posix()
            return snap.get(rel) or assembly.FileState(0, 0)

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
                    rej.path.relative_to(study.folder).as_posix(),
                    rej.reason,
                )
        if logged > MAX_REJECT_LOG_LINES:
            logger.warning(
                "gateway=%s study=%s %d more file(s) rejected; reasons in the ledger",
                study.gateway_id,
                study.study_uid,
                logged - MAX_REJECT_LOG_LINES,
            )
        self.ledger.record_instances(study.gateway_id, study.study_uid, records)

    def _route_and_run(self, study: Study, pending: _Pending, now: float) -> bool:
        gw = self.config.gateway(study.gateway_id)
        digest = assembly.inputs_digest(study.instances)
        model, why_not = select_model(gw.rules, self.models, study)
        if model is None:
            existing = self.ledger.find_run(study.gateway_id, study.study_uid, digest, "none", "-")
            if existing is None:
                run_id = self.ledger.start_run(
                    study.gateway_id, study.study_uid, "none", "-", digest, len(study.instances)
                )
                self.ledger.set_run_state(run_id, RunState.SKIPPED, why_not)
            self.ledger.set_study_state(
                study.gateway_id, study.study_uid, StudyState.SKIPPED, why_not
            )
            return True
        readiness = model.ready()
        if not readiness.ok:
            self.ledger.set_study_state(
                study.gateway_id, study.study_uid, StudyState.WAITING_MODEL, readiness.reason
            )
            pending.next_check = now + RECHECK_SECONDS
            return False
        existing = self.ledger.find_run(
            study.gateway_id, study.study_uid, digest, model.name, model.version
        )
        if existing is not None and not pending.force_generation:
            if existing.state != RunState.RUNNING:
                return True  # these inputs already ran with this model version
            run_id, generation = existing.run_id, existing.generation  # interrupted: finish it
            logger.info(
                "gateway=%s study=%s resuming interrupted run %d",
                study.gateway_id,
                study.study_uid,
                run_id,
            )
        else:
            generation = (
                self.ledger.next_generation(study.gateway_id, study.study_uid, digest)
                if existing is not None
                else 0
            )
            run_id = self.ledger.start_run(
                study.gateway_id,
                study.study_uid,
                model.name,
                model.version,
                digest,
                len(study.instances),
                generation,
            )
        pending.force_generation = False
        self.execute_run(run_id, study, model, digest, generation, stable_at=pending.stable_at)
        return True

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
        """Start ``model`` on ``study`` in the pipeline; :meth:`_complete` records the outcome
        and makes the one send attempt.

        The run's timings record durations (``prepare_s``, ``forward_s``, ``build_s`` or
        ``model_s``, ``write_s``, ``gate_s``, the forward's ``batch`` size) and wall clock
        moments (epoch seconds): ``stable_at`` when the engine found the study quiet for
        ``stable_seconds`` (when known), ``started_at`` and ``written_at``; the send's own
        row has its end.
        """
        gid, suid = study.gateway_id, study.study_uid
        self._runs_started += 1
        self.ledger.set_study_state(gid, suid, StudyState.RUNNING, f"run {run_id} ({model.name})")
        uids = UidFactory(
            self.config.uid_root, gid, suid, digest, model.name, model.version, str(generation)
        )
        timings: dict[str, float] = {"started_at": time.time()}
        if stable_at:
            timings["stable_at"] = stable_at
        layout = self.config.gateway(gid).layout
        ctx = RunContext(uids=uids, run_id=run_id, started=datetime.now())
        self._in_flight[(gid, study.folder.name)] = b""
        self._pipeline.submit(Job(run_id, study, model, ctx, layout, timings))

    def _complete_finished(self) -> int:
        """Record every run and send finished since the last call; how many."""
        sends = self._record_finished_sends()
        outcomes = self._pipeline.pump()
        for outcome in outcomes:
            job = outcome.job
            key = (job.study.gateway_id, job.study.folder.name)
            listing = self._in_flight.pop(key, None)
            try:
                self._complete(outcome)
            except Exception as exc:  # one study never stops the service
                logger.exception("gateway=%s study=%s completion failed", *key)
                self.ledger.event(key[0], job.study.study_uid, "ERROR", f"unexpected: {exc}")
            if listing:
                self._mark_finished(key, listing)
        return len(outcomes) + sends

    def _complete(self, outcome: Outcome) -> None:
        job, done, timings = outcome.job, outcome.finished, outcome.timings
        run_id, gid, suid = job.run_id, job.study.gateway_id, job.study.study_uid
        if "model_s" not in timings:
            stages = ("prepare_s", "forward_s", "build_s")
            timings["model_s"] = sum(timings.get(k, 0.0) for k in stages)
        for out in done.written:
            self.ledger.add_output(
                run_id, out.path, out.sop_class_uid, out.sop_instance_uid, out.series_instance_uid
            )
        if done.error:
            self.ledger.set_run_state(run_id, RunState.FAILED, done.error, timings=timings)
            self.ledger.set_study_state(gid, suid, StudyState.FAILED, done.error)
            self.ledger.event(gid, suid, "ERROR", f"run {run_id} failed: {done.error}")
            return
        if not done.written:
            reason = "model produced no output"
            self.ledger.set_run_state(
                run_id, RunState.SKIPPED, reason, timings=timings, findings=done.findings
            )
            self.ledger.set_study_state(gid, suid, StudyState.SKIPPED, reason)
            return
        if done.problems:
            self._quarantine(run_id, job.study, done.problems, timings, done.findings)
            return
        timings["written_at"] = time.time()
        self.ledger.set_run_state(run_id, RunState.WRITTEN, timings=timings, findings=done.findings)
        paths = [out.path for out in done.written]
        self.ledger.set_study_state(
            gid, suid, StudyState.WRITTEN, f"run {run_id}: {len(paths)} object(s) written"
        )
        self.send_run(run_id, gid, suid, paths)

    def _quarantine(
        self,
        run_id: int,
        study: Study,
        problems: list[Finding],
        timings: dict[str, float],
        findings: dict[str, Any],
    ) -> None:
        """The conformance gate failed: nothing leaves, failing objects go to quarantine."""
        for finding in problems:
            if finding.path.exists():
                moved = quarantine_file(finding.path, self.config.quarantine_dir, study.gateway_id)
                logger.error(
                    "gateway=%s study=%s output %s quarantined to %s: %s",
                    study.gateway_id,
                    study.study_uid,
                    finding.path.name,
                    moved,
                    finding.message,
                )
        first = problems[0]
        reason = f"conformance gate: {len(problems)} problem(s); {first.path.name}: {first.message}"
        self.ledger.set_run_state(
            run_id, RunState.FAILED, reason, timings=timings, findings=findings
        )
        self.ledger.set_study_state(study.gateway_id, study.study_uid, StudyState.FAILED, reason)
        self.ledger.event(study.gateway_id, study.study_uid, "ERROR", f"run {run_id}: {reason}")

    def send_run(
        self,
        run_id: int,
        gateway_id: str,
        study_uid: str,
        paths: list[Path],
        manual: bool = False,
        wait: bool = False,
    ) -> None:
        """One C-STORE association for the run's outputs, never retried.

        The association runs on a send thread, so a slow or silent PACS (up to its
        ``timeout_seconds``) holds up neither other runs nor other gateways; the outcome is
        recorded by the engine thread when it ends (``wait``: before returning).
        """
        from service.sender import send_files

        destination = self.config.destination(gateway_id)
        if not destination.enabled:
            logger.info("gateway=%s study=%s no destination configured", gateway_id, study_uid)
            return
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        send_id = self.ledger.start_send(run_id, where, manual)
        self.ledger.set_run_state(run_id, RunState.SENDING)
        self.ledger.set_study_state(gateway_id, study_uid, StudyState.SENDING, where)
        sending = _Send(run_id, gateway_id, study_uid, send_id)
        sending.future = self._send_pool.submit(send_files, destination, paths)
        if wait:
            self._record_send(sending, sending.future.result())
        else:
            self._sends.append(sending)

    def _record_finished_sends(self) -> int:
        done = [s for s in self._sends if s.future.done()]
        self._sends = [s for s in self._sends if not s.future.done()]
        for sending in done:
            self._record_send(sending, sending.future.result())
        return len(done)

    def _record_send(self, sending: _Send, result: SendResult) -> None:
        self.ledger.finish_send(
            sending.send_id,
            str(result.status),
            result.reason,
            [(i.sop_instance_uid, str(i.status), i.status_code) for i in result.items],
        )
        ok = result.status in (SendStatus.SUCCESS, SendStatus.WARNING)
        run_state = RunState.SENT if ok else RunState.SEND_FAILED
        reason = f"{result.status}: {result.reason}" if result.reason else str(result.status)
        codes = sorted({i.status_code for i in result.items if i.status_code})
        if codes:
            reason += " (status " + ", ".join(f"0x{c:04X}" for c in codes) + ")"
        self.ledger.set_run_state(sending.run_id, run_state, "" if ok else reason)
        state = StudyState.SENT if ok else StudyState.SEND_FAILED
        self.ledger.set_study_state(sending.gateway_id, sending.study_uid, state, reason)

    def resend(self, gateway_id: str, study_uid: str) -> bool:
        """Operator-triggered new send attempt of the study's latest written run."""
        runs = [r for r in self.ledger.runs(gateway_id, study_uid) if self.ledger.outputs(r.run_id)]
        if not runs:
            return False
        run = runs[-1]
        paths = [Path(row["path"]) for row in self.ledger.outputs(run.run_id)]
        self.send_run(run.run_id, gateway_id, study_uid, paths, manual=True, wait=True)
        return True

    # -- whole folders ---------------------------------------------------------------------

    def discover(self) -> list[str]:
        """Gateway ids present under INPUT now (recorded in the ledger)."""
        found: list[str] = []
        root = self.config.input_dir
        if not root.is_dir():
            return found
        for child in sorted(root.iterdir()):
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
        """Whether runs are in the pipeline or sends in progress."""
        return self._pipeline.in_flight > 0 or bool(self._sends)

    def wait(self, timeout: float, stop: threading.Event | None = None) -> None:
        """Pause between ticks: until a run's stage or a send completes when some are in
        flight, else until ``timeout`` or ``stop``."""
        if self.busy:
            self._pipeline.wait(timeout, [s.future for s in self._sends])
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
            if not ran:
                self.wait(min(poll, max(0.0, deadline - time.monotonic())), stop)
        self.finish_in_flight(deadline - time.monotonic())
        return self.pending_count == 0 and not self.busy

    def finish_in_flight(self, timeout: float) -> bool:
        """Complete the runs already in the pipeline, starting none; True when none is left.
        A run still unfinished at ``timeout`` stays ``running`` and resumes at the next start."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            self.wait(max(0.0, min(0.5, deadline - time.monotonic())))
            self._complete_finished()
        return not self.busy

    def close(self) -> None:
        """Stop workers and send threads; a send still open is recorded as interrupted at
        the next start."""
        self._pipeline.close()
        self._send_pool.shutdown(wait=False, cancel_futures=True)
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


def _listing_digest(snap: assembly.Snapshot) -> bytes:
    """A digest of a folder listing (paths, sizes, mtimes) to compare listings cheaply."""
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(snap):
        state = snap[rel]
        h.update(f"{rel}\0{state.size}\0{state.mtime_ns}\n".encode())
    return h.digest()


def request_reprocess(config: Config, gateway_id: str, study_uid: str) -> Path:
    """Ask the (running or next) service to run a study again with a new output series."""
    if not GATEWAY_ID_RE.match(gateway_id):
        raise ConfigError("gateway_id", f"not a valid gateway id: {gateway_id!r}")
    if assembly.study_uid_from_folder(study_uid) is None:
        raise ConfigError("study_uid", "not a valid study folder name")
    target = config.state_dir / REQUESTS_DIR / f"{gateway_id}__{study_uid}"
    atomic_write(target, lambda fh: fh.write(b"reprocess\n"))
    return target
