"""Readiness (intake): is a touched study folder ready to run, and if not, why and when to
look again.

:meth:`Readiness.look` takes one study folder and its :class:`Watch` (what the scheduler
knows of it) and returns a verdict, a value: :class:`Drop` (nothing to do until touched
again), :class:`Receiving`, :class:`Later` (queued, or waiting for image.db's instances or
its lock), :class:`Transient` (a condition that may pass), :class:`Skip` (nothing usable),
:class:`Refuse` (content that must not run, e.g. two patients) or :class:`Ready` with the
assembled :class:`~service.values.Study`. It never writes the ledger: the engine records
each verdict.

The rule: no file added or changed for ``stable_seconds`` (monotonic clock; file mtimes are
only compared with themselves), every file complete DICOM, and image.db's instances present
(a locked image.db is waited for) or ``max_wait_seconds`` passed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service import assembly
from service.assembly import Assembler, Stability
from service.config import Config
from service.errors import TransientError
from service.fsutil import is_within
from service.imagedb import ImageDb
from service.ledger import InstanceRecord, printable
from service.values import FileState, Rejected, Snapshot, Study, StudyState

logger = logging.getLogger(__name__)

GATEWAY_PREFIX = "gateway_"
#: Seconds between re-checks of a study waiting for a model or for image.db's instances.
RECHECK_SECONDS = 5.0
#: Rejected files logged one by one per study check; the rest are counted in one line.
MAX_REJECT_LOG_LINES = 20


@dataclass
class Watch:
    """What the scheduler knows of one touched study folder."""

    first_seen: float
    stable_since: float | None = None  # monotonic time the study was first found stable
    stable_at: float = 0.0  # wall-clock time of the same moment, recorded in run timings
    next_check: float = 0.0
    force_generation: bool = False  # reprocess: run again even if this digest ran
    observed: bool = False  # looked at at least once
    queued: bool = False  # stable, waiting for room in the pipeline
    transient: bool = False  # waiting for a transient condition to pass


# -- verdicts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """Nothing to do until the folder is touched again (gone, empty, unchanged since it
    finished, or an unsafe name: ``event`` says so)."""

    event: str = ""


@dataclass(frozen=True)
class Receiving:
    """Not quiet yet; ``changed``: its files changed since the last look."""

    changed: bool
    next_check: float


@dataclass(frozen=True)
class Later:
    """Look again at ``next_check``; ``state``/``reason`` to record (None: keep the state)."""

    next_check: float
    state: StudyState | None = None
    reason: str = ""


@dataclass(frozen=True)
class Transient:
    """A condition that may pass (I/O error, mount away): wait, then try again."""

    reason: str


@dataclass(frozen=True)
class Skip:
    reason: str
    records: list[InstanceRecord]
    listing: bytes


@dataclass(frozen=True)
class Refuse:
    """The study's content cannot be run (e.g. instances of two patients): ``failed``."""

    reason: str
    records: list[InstanceRecord]
    listing: bytes


@dataclass(frozen=True)
class Ready:
    """Complete and stable: run it. ``events`` are warnings to record with it."""

    study: Study
    listing: bytes
    records: list[InstanceRecord]
    events: list[tuple[str, str]] = field(default_factory=list)


Verdict = Drop | Receiving | Later | Transient | Skip | Refuse | Ready


class Readiness:
    """Looks at study folders for the engine (one thread); caches inspections and the
    listings of finished studies (``finished_listing`` reads them from the ledger)."""

    def __init__(self, config: Config, finished_listing: Callable[[str, str], bytes | None]):
        self.config = config
        self._finished_listing = finished_listing
        self._stability = Stability()
        self._assembler = Assembler()
        #: digest of the listing each study had when it was last finished: a touch (a full
        #: rescan, a restart) of an unchanged finished study costs one listing
        self._finished: dict[tuple[str, str], bytes] = {}

    def finished(self, key: tuple[str, str], listing: bytes) -> None:
        """The study ``key`` is finished with ``listing`` (recorded in the ledger too)."""
        self._finished[key] = listing

    def forget(self, key: tuple[str, str]) -> None:
        """The study needs no attention until touched again: drop its quiet-period clock."""
        self._stability.forget(key)

    def _listing_of_finished(self, key: tuple[str, str]) -> bytes | None:
        if key not in self._finished:
            stored = self._finished_listing(*key)
            if stored is None:
                return None
            self._finished[key] = stored
        return self._finished[key]

    def look(
        self, gateway_id: str, study_name: str, watch: Watch, now: float, room: bool = True
    ) -> Verdict:
        """The verdict on one study folder. Without ``room`` in the pipeline a study is
        still watched until it is stable (its quiet period runs meanwhile), then queued."""
        gw = self.config.gateway(gateway_id)
        study_uid = assembly.study_uid_from_folder(study_name)
        gateway_dir = self.config.input_dir / f"{GATEWAY_PREFIX}{gateway_id}"
        folder = gateway_dir / study_name
        key = (gateway_id, study_name)
        try:
            unsafe = study_uid is None or folder.is_symlink() or not is_within(folder, gateway_dir)
        except OSError as exc:  # ENOTCONN, EIO, ESTALE: the mount is away
            return Transient(f"study folder cannot be reached: {exc.strerror or exc}")
        if unsafe or study_uid is None:
            logger.warning("gateway=%s ignoring unsafe study folder name", gateway_id)
            return Drop(f"unsafe study folder name ignored: {printable(study_name)!r}")
        try:
            snap = assembly.snapshot(folder, self.config.input_dir)
        except TransientError as exc:
            return Transient(str(exc))
        if not snap:
            if not gateway_dir.is_dir():  # the gateway's folder (the mount) is away
                return Transient(f"input folder {gateway_dir.name} is not reachable")
            return Drop()  # folder gone or empty: nothing to do until touched again
        listing = listing_digest(snap)
        if not watch.force_generation and self._listing_of_finished(key) == listing:
            return Drop()  # unchanged since it was finished (touched by a rescan or a restart)
        quiet = self._stability.observe(key, snap, now)
        if quiet < gw.stable_seconds:
            changed = watch.observed and quiet == 0.0
            watch.observed = True
            watch.stable_since = None
            watch.queued = False
            return Receiving(changed, now + min(1.0, gw.stable_seconds - quiet))
        if watch.stable_since is None:
            watch.stable_since = now
            watch.stable_at = time.time()
        if not room:
            first = not watch.queued
            watch.queued = True
            reason = "stable; queued until the pipeline has room"
            return Later(now + RECHECK_SECONDS, StudyState.READY if first else None, reason)
        watch.queued = False
        study = self._assemble(gateway_id, study_uid, folder, snap)
        if study.unreadable:
            first_bad = study.unreadable[0]
            return Transient(
                f"{len(study.unreadable)} file(s) cannot be read now "
                f"({printable(first_bad.path.name)}: {first_bad.reason})"
            )
        try:
            relisted = (
                assembly.snapshot(folder, self.config.input_dir) if study.incomplete else snap
            )
        except TransientError as exc:
            return Transient(str(exc))
        if relisted != snap:
            # a file vanished or changed while being read: wait for a quiet listing again
            watch.stable_since = None
            return Later(now + min(1.0, gw.stable_seconds))
        records = instance_records(study, snap)
        if not study.instances:
            return Skip("no usable DICOM instance in the study", records, listing)
        if study.refused:  # e.g. instances of two patients: a verdict on the content
            return Refuse(study.refused, records, listing)
        copies = self.config.state_dir / "imagedb" / f"{GATEWAY_PREFIX}{gateway_id}"
        imagedb = ImageDb(gateway_dir / "image.db", copy_dir=copies)  # WAL: a local snapshot
        expected = imagedb.expected_instances(study_uid)
        waited = now - watch.stable_since
        recheck = now + min(RECHECK_SECONDS, gw.max_wait_seconds - waited)
        if expected is None and imagedb.transient and waited < gw.max_wait_seconds:
            return Later(recheck, StudyState.WAITING, imagedb.last_error)
        events: list[tuple[str, str]] = []
        if expected is None and imagedb.path.exists():  # locked too long or corrupt: say so
            events.append(("WARNING", f"{imagedb.last_error}; using the files' own tags"))
        missing = (expected or set()) - study.sop_uids
        if missing:
            if waited < gw.max_wait_seconds:
                why = f"image.db lists {len(missing)} instance(s) not on disk yet"
                return Later(recheck, StudyState.WAITING, why)
            events.append(
                (
                    "WARNING",
                    f"ran with {len(study.instances)} instance(s); image.db lists "
                    f"{len(missing)} more that never arrived within {gw.max_wait_seconds:g} s",
                )
            )
        return Ready(study, listing, records, events)

    def rebuild(self, gateway_id: str, study_name: str) -> tuple[Study, bytes] | str:
        """A study folder assembled again as it is now, to execute a run another node
        started (no quiet period, no image.db wait: its intake already decided): the
        study and its listing digest, or why it cannot run now."""
        study_uid = assembly.study_uid_from_folder(study_name)
        gateway_dir = self.config.input_dir / f"{GATEWAY_PREFIX}{gateway_id}"
        folder = gateway_dir / study_name
        try:
            if study_uid is None or folder.is_symlink() or not is_within(folder, gateway_dir):
                return "unsafe study folder name"
            snap = assembly.snapshot(folder, self.config.input_dir)
        except (OSError, TransientError) as exc:
            return f"study folder cannot be read now: {exc}"
        if not snap:
            return "study folder is gone or empty"
        study = self._assemble(gateway_id, study_uid, folder, snap)
        if study.unreadable:
            return f"{len(study.unreadable)} file(s) cannot be read now"
        if study.incomplete:
            return f"{len(study.incomplete)} file(s) incomplete"
        if not study.instances or study.refused:
            return study.refused or "no usable DICOM instance"
        return study, listing_digest(snap)

    def _assemble(self, gateway_id: str, study_uid: str, folder: Path, snap: Snapshot) -> Study:
        """The study assembled from the listing ``snap`` under the configured limits."""
        return self._assembler.assemble(
            gateway_id,
            study_uid,
            folder,
            snap,
            max_file_bytes=self.config.max_file_bytes,
            max_pixels=self.config.max_pixels,
            max_elements=self.config.max_elements,
        )


def instance_records(study: Study, snap: Snapshot) -> list[InstanceRecord]:
    """What the ledger records of a study's files: used instances and rejected files with
    the reason (the rejections are logged too, at most MAX_REJECT_LOG_LINES a look)."""

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


def listing_digest(snap: Snapshot) -> bytes:
    """A digest of a folder listing (paths, sizes, mtimes) to compare listings cheaply."""
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(snap):
        state = snap[rel]
        h.update(f"{rel}\0{state.size}\0{state.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.digest()
