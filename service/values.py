"""Value types shared by every stage: files, instances, studies and their states.

Models import these (never intake code). The legal state changes are tables here; the
ledger (:mod:`service.ledger`) refuses any change that is not in them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileState:
    """What a listing tells about a file: enough to notice any change."""

    size: int
    mtime_ns: int


#: relative path (posix, from the study folder) -> state
Snapshot = dict[str, FileState]


@dataclass(frozen=True)
class Instance:
    """One parsed, complete DICOM instance. Holds no patient identifiers: ``patient_key``
    and ``issuer_key`` are salted digests of PatientID and IssuerOfPatientID (the salt is
    drawn per process and never stored), only to compare instances of one study."""

    path: Path
    size: int
    sha256: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str = ""
    body_part: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    patient_key: str = field(default="", repr=False)
    issuer_key: str = field(default="", repr=False)  # "": no IssuerOfPatientID


@dataclass(frozen=True)
class Rejected:
    """A file that is not used, with the reason recorded in the ledger."""

    path: Path
    reason: str
    quarantine: bool = True  # False: ignored silently-but-recorded (e.g. temp names)
    transient: bool = False  # the file could not be read (I/O error): try again later


@dataclass
class Study:
    """The instances of one study folder of one gateway, as last assembled."""

    gateway_id: str
    study_uid: str
    folder: Path
    instances: list[Instance] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)  # still being written: wait
    #: files that could not be read for a reason that may pass (I/O error, mount away)
    unreadable: list[Rejected] = field(default_factory=list)
    #: why the study as a whole is refused (e.g. instances of several patients); "" if not
    refused: str = ""

    @property
    def sop_uids(self) -> set[str]:
        return {i.sop_instance_uid for i in self.instances}


# -- states ----------------------------------------------------------------------------------


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # files seen, not yet stable/complete
    WAITING = "waiting"  # image.db lists missing instances, or a transient error: retried
    WAITING_MODEL = "waiting_model"  # routed to a model that is not ready (weights missing)
    READY = "ready"  # stable, queued until the pipeline has room
    RUNNING = "running"
    WRITTEN = "written"  # outputs written; send queued, or no destination
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


class SendState(enum.StrEnum):
    """A send's own state: queued, open, or how it ended (the sender's outcome values)."""

    QUEUED = "queued"  # waiting for its destination's lane; no association yet
    SENDING = "sending"  # committed before the association opens
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    REFUSED = "refused"
    REJECTED = "rejected"
    ABORTED = "aborted"
    TIMED_OUT = "timed_out"
    NO_CONTEXT = "no_context"
    ERROR = "error"
    INTERRUPTED = "interrupted"  # the service stopped while the association was open


FINAL_STUDY_STATES = frozenset(
    {StudyState.SENT, StudyState.SEND_FAILED, StudyState.FAILED, StudyState.SKIPPED}
)
FINAL_RUN_STATES = frozenset(
    {RunState.SENT, RunState.SEND_FAILED, RunState.FAILED, RunState.SKIPPED}
)
SENT_OK = frozenset({SendState.SUCCESS, SendState.WARNING})

_BEFORE_RUN = frozenset(
    {
        StudyState.RECEIVING,
        StudyState.WAITING,
        StudyState.WAITING_MODEL,
        StudyState.READY,
        StudyState.RUNNING,
        StudyState.SKIPPED,
        StudyState.FAILED,
    }
)
_AFTER_SEND = _BEFORE_RUN | {StudyState.SENDING}  # new files, reprocess, or resend

#: Legal study state changes (PS-independent: our own life cycle). A state may always be
#: kept with a new reason. ``None`` is a study the ledger has not seen yet.
STUDY_TRANSITIONS: Mapping[StudyState | None, frozenset[StudyState]] = {
    None: _BEFORE_RUN,
    StudyState.RECEIVING: _BEFORE_RUN,
    StudyState.WAITING: _BEFORE_RUN,
    StudyState.WAITING_MODEL: _BEFORE_RUN,
    StudyState.READY: _BEFORE_RUN,
    # a run ends written, failed or skipped; a transient error sends it back to waiting,
    # and a run cut short by a stop is resumed, or superseded when its files changed
    StudyState.RUNNING: _BEFORE_RUN | {StudyState.WRITTEN},
    StudyState.WRITTEN: _AFTER_SEND,
    StudyState.SENDING: frozenset({StudyState.SENT, StudyState.SEND_FAILED}),
    StudyState.SENT: _AFTER_SEND,
    # a send recorded interrupted by another node, whose own node then saw it delivered
    StudyState.SEND_FAILED: _AFTER_SEND | {StudyState.SENT},
    StudyState.FAILED: _AFTER_SEND,
    StudyState.SKIPPED: _AFTER_SEND,
}

#: Legal run state changes; ``None`` is a new run.
RUN_TRANSITIONS: Mapping[RunState | None, frozenset[RunState]] = {
    None: frozenset({RunState.RUNNING, RunState.SKIPPED}),
    RunState.RUNNING: frozenset({RunState.WRITTEN, RunState.FAILED, RunState.SKIPPED}),
    RunState.WRITTEN: frozenset({RunState.SENDING}),
    RunState.SENDING: frozenset({RunState.SENT, RunState.SEND_FAILED}),
    RunState.SENT: frozenset({RunState.SENDING}),  # resend
    # resend; or sent: the late outcome of a send recorded interrupted by another node
    RunState.SEND_FAILED: frozenset({RunState.SENDING, RunState.SENT}),
    RunState.FAILED: frozenset(),
    RunState.SKIPPED: frozenset(),
}

_SEND_OUTCOMES = frozenset(SendState) - {SendState.QUEUED, SendState.SENDING}

#: Legal send state changes; ``None`` is a new send. A queued send never opened an
#: association, so it may still start after a restart; an open one is ``interrupted``.
#: ``interrupted`` may still become the real outcome: on a shared ledger another node
#: records a silent node's open send interrupted, and when that send's association ends
#: after all, the node that opened it records how it ended (the ledger checks the node).
SEND_TRANSITIONS: Mapping[SendState | None, frozenset[SendState]] = {
    None: frozenset({SendState.QUEUED}),
    SendState.QUEUED: frozenset({SendState.SENDING, SendState.ERROR}),
    SendState.SENDING: _SEND_OUTCOMES,
    **{s: frozenset() for s in _SEND_OUTCOMES},
    SendState.INTERRUPTED: _SEND_OUTCOMES - {SendState.INTERRUPTED},
}
