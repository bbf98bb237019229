"""Supervision: one service per STATE folder, a heartbeat, and the health verdict.

* :class:`InstanceLock`: ``STATE/serve.lock`` held with ``flock`` for the life of ``serve``;
  a second ``serve`` on the same STATE fails at once (two services would send twice). The
  kernel releases the lock when the process dies, however it dies.
* :class:`Heartbeat`: ``STATE/heartbeat`` rewritten every :data:`HEARTBEAT_SECONDS` by a
  thread of its own while the service loop is alive, with the queue and the age of the
  loop's last turn; when the service stops because it cannot go on, the heartbeat says so.
* :func:`health`: healthy only when a service holds the lock, its heartbeat is at most two
  beats old, its loop turned within :data:`LOOP_STALL_SECONDS`, and it reported no fatal
  error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from service.errors import GatewayError
from service.fsutil import atomic_write

logger = logging.getLogger(__name__)

LOCK_NAME = "serve.lock"
HEARTBEAT_NAME = "heartbeat"
#: Seconds between heartbeats; ``status --health`` fails after two missed ones.
HEARTBEAT_SECONDS = 5.0
#: A service loop that has not completed a turn for this long is reported stalled.
LOOP_STALL_SECONDS = 300.0


class AlreadyServing(GatewayError):
    """Another service holds this STATE folder."""


class StateUnwritable(GatewayError):
    """The STATE folder cannot be written: the service cannot start."""


class InstanceLock:
    """An exclusive ``flock`` on ``STATE/serve.lock`` (released by the kernel at exit)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the service
        except OSError as exc:
            raise StateUnwritable(
                f"cannot write STATE {self.path.parent} ({exc.strerror or exc}): check that it "
                "is writable by the service and has space, then restart it"
            ) from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise AlreadyServing(
                f"another service (pid {holder}) is already serving {self.path.parent}; "
                "one STATE folder serves one INPUT (several machines share one PostgreSQL "
                "ledger instead): stop the other one first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def is_served(state_dir: Path) -> bool:
    """Whether some process holds ``state_dir``'s lock now (a service is running)."""
    path = state_dir / LOCK_NAME
    try:
        fh = open(path)  # noqa: SIM115
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


class Heartbeat:
    """Writes ``STATE/heartbeat`` from its own thread while the loop is alive.

    ``queue`` returns the numbers to publish (studies pending, runs, sends); the loop
    calls :meth:`turned` after each turn. A failure to write the heartbeat (STATE full or
    read-only) is reported through ``on_error`` once and ends the beating.
    """

    def __init__(
        self,
        state_dir: Path,
        queue: Callable[[], dict[str, int]],
        on_error: Callable[[BaseException], None],
        unreachable: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.path = state_dir / HEARTBEAT_NAME
        self._queue = queue
        self._unreachable = unreachable
        self._on_error = on_error
        self._stop = threading.Event()
        self._last_turn = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def turned(self) -> None:
        self._last_turn = time.monotonic()

    def loop_age(self) -> float:
        """Seconds since the loop's last turn (the loop-alive signal: a node's heartbeat
        in a shared ledger is written only while it is recent)."""
        return time.monotonic() - self._last_turn

    def beat(self, fatal: str = "") -> None:
        data: dict[str, Any] = {
            "pid": os.getpid(),
            "loop_age_s": round(self.loop_age(), 1),
            **self._queue(),
        }
        if fatal:
            data["fatal"] = fatal
        unreachable = self._unreachable() if self._unreachable is not None else {}
        if unreachable:
            data["unreachable"] = unreachable
        payload = json.dumps(data).encode()
        atomic_write(self.path, lambda fh: fh.write(payload))

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.beat()
            except Exception as exc:
                self._on_error(exc)
                return

    def stop(self, fatal: str = "") -> None:
        """Stop beating; with ``fatal``, leave that reason for ``status --health``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(HEARTBEAT_SECONDS)
        if fatal:
            with contextlib.suppress(Exception):
                self.beat(fatal)


@dataclass(frozen=True)
class Health:
    ok: bool
    message: str


def health(state_dir: Path, now: float | None = None) -> Health:
    """The verdict of ``status --health`` (PS-independent: Docker HEALTHCHECK semantics)."""
    now = time.time() if now is None else now
    path = state_dir / HEARTBEAT_NAME
    try:
        age = now - path.stat().st_mtime
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return Health(False, f"unhealthy: no heartbeat at {path}")
    if not isinstance(info, dict):
        return Health(False, f"unhealthy: heartbeat {path} is not readable")
    if info.get("fatal"):
        return Health(False, f"unhealthy: the service stopped: {info['fatal']}")
    if not is_served(state_dir):
        return Health(False, f"unhealthy: no service is running on {state_dir}")
    if age > 2 * HEARTBEAT_SECONDS:
        return Health(False, f"unhealthy: no heartbeat for {age:.0f} s")
    loop_age = float(info.get("loop_age_s", 0.0))
    if loop_age > LOOP_STALL_SECONDS:
        return Health(False, f"unhealthy: the service loop has not turned for {loop_age:.0f} s")
    unreachable = info.get("unreachable")
    if isinstance(unreachable, dict) and unreachable:
        what = "; ".join(f"{name} unreachable: {why}" for name, why in sorted(unreachable.items()))
        return Health(False, f"unhealthy: {what} (studies wait and are retried)")
    queue = ", ".join(f"{info[k]} {k}" for k in ("pending", "running", "sending") if k in info)
    return Health(True, f"healthy ({queue})" if queue else "healthy")
