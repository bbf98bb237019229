"""File-system helpers: atomic writes and confinement of paths to configured roots."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

#: Prefix of every temporary file the service writes; swept at start.
TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_writer(target: Path) -> Iterator[IO[bytes]]:
    """Write ``target`` via a temp file in the same folder, fsync, then rename.

    A reader never sees half a file; on any error the temp file is removed and
    ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write(target: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fh)`` inside :func:`atomic_writer`."""
    with atomic_writer(target) as fh:
        write(fh)


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new link) durable; best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_temp_files(root: Path) -> int:
    """Remove temp files left by an interrupted write under ``root``; return the count."""
    count = 0
    if not root.is_dir():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(TMP_PREFIX):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    count += 1
                except OSError as exc:
                    logger.warning("cannot remove temp file %s: %s", name, exc.strerror)
    return count


def is_within(path: Path, root: Path) -> bool:
    """True when ``path`` resolves (symlinks followed) inside ``root``."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def safe_name(value: str, max_len: int = 64) -> str | None:
    """``value`` when usable as one path component, else None.

    Refuses empty names, ``.``/``..``, separators, NUL and control characters, so a hostile
    UID can never address a path outside its folder.
    """
    if not value or len(value) > max_len or value in (".", ".."):
        return None
    if any(ch in value for ch in "/\\\x00") or any(ord(ch) < 32 for ch in value):
        return None
    return value


class MountProbe:
    """Whether a configured folder (INPUT, OUTPUT) is reachable now: it can be stat'ed (a
    FUSE mount whose daemon died answers ENOTCONN, a failing disk EIO, NFS ESTALE), and a
    folder that was a mount point when first probed still is (a mount that vanished
    leaves its empty mount point)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mount: bool | None = None

    def check(self) -> str:
        """Why the folder is unreachable now, or ""."""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            return "does not exist" if self._mount else ""
        except OSError as exc:
            return exc.strerror or str(exc)
        mount = os.path.ismount(self.path)
        if self._mount is None:
            self._mount = mount
        elif self._mount and not mount:
            return "its mount point is no longer mounted"
        return ""
