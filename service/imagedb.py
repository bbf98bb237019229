"""Read-only access to a gateway's ``image.db``: which instances it says a study has.

The gateway desktop app writes ``INPUT/gateway_<id>/image.db`` (SQLite; tables patient, study,
series, image linked by ``referenceId`` -> parent ``id``). We only ever open it read-only, with
a fresh connection per call because the app rewrites the file, and we never fail because of it:
a missing, locked or corrupt database gives ``None``. A locked or unreachable one is
*transient* (:attr:`ImageDb.transient`): the engine waits for it, up to the gateway's
``max_wait_seconds``, rather than reading it as "no expectation".

**On read-only and network mounts.** A database in rollback-journal mode is opened in place,
read-only (``mode=ro``), honouring the app's locks. A database in WAL mode (file header
bytes 18-19 = 2) cannot be read in place there: opening it needs its ``-shm`` shared-memory
file (created beside it: a write into the app's folder, impossible on a read-only mount,
and WAL's shared memory does not work across hosts on network file systems). So, given a
``copy_dir`` (the service uses ``STATE/imagedb/gateway_<id>/``), such a database, or one
that cannot be opened in place, is read from a local snapshot: ``image.db`` and its
``image.db-wal`` copied together, again only when the size or mtime of either changed, and
kept only when neither changed during the copy (else: transient, tried again). Nothing is
ever written beside the app's file.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path

from sqlite_utils import Database

logger = logging.getLogger(__name__)

_REQUIRED_TABLES = ("study", "series", "image")

_EXPECTED_SQL = """
SELECT image.SOPInstanceUID AS sop_uid
FROM image
JOIN series ON image.referenceId = series.id
JOIN study ON series.referenceId = study.id
WHERE study.StudyInstanceUID = ?
"""

#: (size, mtime) of image.db and of its -wal when each local snapshot was taken, per copy
_COPIED: dict[Path, tuple[tuple[int, int] | None, ...]] = {}
_COPY_LOCK = threading.Lock()


class ImageDb:
    """The ``image.db`` of one gateway, opened read-only on each query."""

    def __init__(
        self, path: Path, busy_timeout_ms: int = 2000, copy_dir: Path | None = None
    ) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.copy_dir = copy_dir
        #: Why the last query returned None; "" after a successful query.
        self.last_error = ""
        #: Whether that reason may pass by itself (locked, I/O error, mount away): the
        #: study then waits for image.db instead of running without it.
        self.transient = False

    def expected_instances(self, study_uid: str) -> set[str] | None:
        """The SOP Instance UIDs listed for ``study_uid``, or None when unreadable.

        An empty set means the database is readable but does not know the study.
        """
        try:
            result = self._query(study_uid)
        except _Unusable as exc:
            self._failed(str(exc), transient=False)
            return None
        except sqlite3.Error as exc:
            self._failed(_describe(exc), transient=_is_transient(exc))
            return None
        if self.last_error:
            logger.info("image.db %s is readable again", self.path)
        self.last_error, self.transient = "", False
        return result

    def _query(self, study_uid: str) -> set[str]:
        if not self.path.is_file():
            raise _Unusable("image.db does not exist")
        if self.copy_dir is not None and _is_wal(self.path):
            return self._query_copy(study_uid)
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000)
            return self._query_open(conn, study_uid)
        except sqlite3.OperationalError as exc:
            if self.copy_dir is None or "unable to open" not in str(exc):
                raise
            return self._query_copy(study_uid)  # e.g. a read-only mount

    def _query_copy(self, study_uid: str) -> set[str]:
        copy = self._snapshot()
        conn = sqlite3.connect(copy, timeout=self.busy_timeout_ms / 1000)  # our own copy
        return self._query_open(conn, study_uid)

    def _snapshot(self) -> Path:
        """The local copy of image.db (with its -wal), refreshed when either changed."""
        assert self.copy_dir is not None
        copy = self.copy_dir / "image.db"
        wal = self.path.with_name(self.path.name + "-wal")
        with _COPY_LOCK:
            stamp = _stamps(self.path, wal)
            if _COPIED.get(copy) == stamp and copy.is_file():
                return copy
            _COPIED.pop(copy, None)
            self.copy_dir.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm", "-journal"):
                copy.with_name(copy.name + suffix).unlink(missing_ok=True)
            try:
                shutil.copyfile(self.path, copy)
                if stamp[1] is not None:
                    shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
            except FileNotFoundError as exc:  # the app replaced or checkpointed it meanwhile
                raise sqlite3.OperationalError(
                    f"unable to open: changed while copied ({exc})"
                ) from exc
            except OSError as exc:
                raise sqlite3.OperationalError(f"disk I/O error: {exc.strerror or exc}") from exc
            if _stamps(self.path, wal) != stamp:
                raise sqlite3.OperationalError("database is busy: image.db changed while copied")
            _COPIED[copy] = stamp
            return copy

    def _query_open(self, conn: sqlite3.Connection, study_uid: str) -> set[str]:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            db = Database(conn, recursive_triggers=False, execute_plugins=False)
            missing = [t for t in _REQUIRED_TABLES if t not in db.table_names()]
            if missing:
                raise _Unusable(f"image.db lacks table(s) {', '.join(missing)}")
            return {
                str(row["sop_uid"])
                for row in db.query(_EXPECTED_SQL, [study_uid])
                if row["sop_uid"]
            }
        finally:
            conn.close()

    def _failed(self, reason: str, transient: bool) -> None:
        if reason != self.last_error:  # log each new reason once, not on every call
            what = "waiting for it" if transient else "ignoring it"
            logger.warning("image.db %s unusable, %s: %s", self.path, what, reason)
        self.last_error, self.transient = reason, transient


class _Unusable(Exception):
    pass


def _is_wal(path: Path) -> bool:
    """Whether the database is in WAL mode: its header's read/write versions are 2."""
    try:
        with path.open("rb") as fh:
            header = fh.read(20)
    except OSError:
        return False  # opening it reports the error
    return len(header) == 20 and 2 in (header[18], header[19])


def _stamps(*paths: Path) -> tuple[tuple[int, int] | None, ...]:
    """(size, mtime) of each path, None for one that does not exist."""
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            stamps.append(None)
            continue
        stamps.append((st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return f"image.db is locked by another process ({text})"
    if "not a database" in text or "malformed" in text:
        return f"image.db is corrupt ({text})"
    return f"image.db cannot be read ({type(exc).__name__}: {text})"


def _is_transient(exc: sqlite3.Error) -> bool:
    """Locked, busy, an I/O error or a file that cannot be opened now: may pass."""
    text = str(exc)
    return any(word in text for word in ("locked", "busy", "disk I/O error", "unable to open"))
