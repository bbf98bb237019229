"""Failure notifications: a JSON POST to ``[notify] webhook_url`` when a study ends
``failed`` or ``send_failed``, and when the service cannot go on.

The pipeline never waits for a webhook: :meth:`Notifier.on_applied` (a ledger observer,
called on the engine's thread) only puts the notice on a bounded queue; a thread of its own
posts it with ``timeout_seconds``. Each outcome (delivered with the HTTP status, or failed
with the reason) is recorded as an event of the study through ``record``, which applies a
ledger transition: the ledger stays the only writer of state. The payload holds the
gateway id, the StudyInstanceUID, the state and its reason; no patient data (the ledger
records none).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.config import NotifyConfig
from service.ledger import Applied, Transition
from service.values import StudyState

logger = logging.getLogger(__name__)

#: Study states that are announced.
NOTIFY_STATES = (StudyState.FAILED, StudyState.SEND_FAILED)
#: Notices waiting to be posted; beyond this they are dropped (and logged), never waited for.
QUEUE_SIZE = 1000
#: ``state`` of the notice sent when the service cannot go on.
SERVICE_STOPPED = "service_stopped"


@dataclass(frozen=True)
class Notice:
    gateway_id: str
    study_uid: str
    state: str
    reason: str
    time: str

    def payload(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway_id,
            "study_uid": self.study_uid,
            "state": self.state,
            "reason": self.reason,
            "time": self.time,
        }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: ``record(gateway_id, study_uid, level, message)``: records an outcome as an event.
Recorder = Callable[[str, str, str, str], None]


class Notifier:
    """Posts notices from its own thread; ``record`` writes each outcome to the ledger."""

    def __init__(self, config: NotifyConfig, record: Recorder) -> None:
        self.url = config.webhook_url
        self.timeout = config.timeout_seconds
        self._record = record
        self._queue: queue.Queue[Notice | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        #: outcomes so far, by ``delivered`` / ``failed`` / ``dropped`` (for /metrics)
        self.outcomes: dict[str, int] = {"delivered": 0, "failed": 0, "dropped": 0}

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def on_applied(self, t: Transition, applied: Applied) -> None:
        """Ledger observer: queue a notice when a study changed to failed / send_failed."""
        if applied.study_changed and t.study in NOTIFY_STATES:
            self.notify(Notice(t.gateway_id, t.study_uid, str(t.study), t.reason, _now_iso()))

    def notify_fatal(self, reason: str) -> None:
        """The service cannot go on (it stops after this)."""
        self.notify(Notice("", "", SERVICE_STOPPED, reason, _now_iso()))

    def notify(self, notice: Notice) -> None:
        """Queue ``notice``; never blocks (a full queue drops it, with a warning)."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(notice)
        except queue.Full:
            self.outcomes["dropped"] += 1
            logger.warning(
                "gateway=%s study=%s notification dropped: %d notices already waiting",
                notice.gateway_id,
                notice.study_uid,
                QUEUE_SIZE,
            )

    def close(self, timeout: float) -> None:
        """Post what is queued within ``timeout`` seconds, then stop."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            notice = self._queue.get()
            if notice is None:
                return
            ok, message = self._post(notice)
            self.outcomes["delivered" if ok else "failed"] += 1
            level = "INFO" if ok else "WARNING"
            log = logger.info if ok else logger.warning
            log("gateway=%s study=%s %s", notice.gateway_id, notice.study_uid, message)
            try:
                self._record(notice.gateway_id, notice.study_uid, level, message)
            except Exception as exc:  # the ledger may be what stopped the service
                logger.warning("notification outcome not recorded: %s", exc)

    def _post(self, notice: Notice) -> tuple[bool, str]:
        """One POST; (delivered, what happened)."""
        what = f"webhook notification ({notice.state})"
        body = json.dumps(notice.payload()).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "dicom-ai-gateway"},
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            return False, f"{what} failed: HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            return False, f"{what} failed after {time.monotonic() - started:.1f} s: {why}"
        return True, f"{what} delivered: HTTP {status}"


def ledger_recorder(apply: Callable[[Transition], Applied]) -> Recorder:
    """A :data:`Recorder` that applies an event-only transition (``apply``: the ledger's)."""

    def record(gateway_id: str, study_uid: str, level: str, message: str) -> None:
        apply(Transition(gateway_id, study_uid, events=[(level, message)]))

    return record
