"""Read-only access to a gateway's ``image.db``: which instances it says a study has.

The gateway desktop app writes ``INPUT/gateway_<id>/image.db`` (SQLite; tables patient, study,
series, image linked by ``referenceId`` -> parent ``id``). We only ever open it read-only, with
a fresh connection per call because the app rewrites the file, and we never fail because of it:
a missing, locked or corrupt database gives ``None``. A locked or unreachable one is
*transient* (:attr:`ImageDb.transient`): the engine waits for it, up to the gateway's
``max_wait_seconds``, rather than reading it as "no expectation".
"""

from __future__ import annotations

import logging
import sqlite3
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


class ImageDb:
    """The ``image.db`` of one gateway, opened read-only on each query."""

    def __init__(self, path: Path, busy_timeout_ms: int = 2000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
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
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000)
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
