"""Notices activity in ``INPUT/gateway_<id>/<study folder>/`` and reports the study folder.

Two modes:

``native``
    watchdog's native observer (inotify on Linux) on the whole input root, recursively, so
    new gateway folders are seen too; plus a rescan every ``rescan_seconds`` that catches
    what events miss (moves from elsewhere, overflowed queues, network mounts).
``polling``
    no inotify, and no trust in folder metadata: for cloud mounts (s3fs, gcsfuse, NFS).

Native mode's periodic pass is cheap on a big idle tree: it compares, per study folder, a
signature made of the folder's mtime and the mtimes of its sub-folders (never a stat of
every file) and only touches new folders or folders whose signature changed. A file
rewritten in place leaves every folder mtime unchanged: inotify sees that, and a *full*
pass touches every study folder every ``full_rescan_seconds`` (default 10 x
``rescan_seconds``).

Polling mode trusts only file listings (names, sizes, mtimes: the same
:func:`service.assembly.snapshot` readiness uses), never folder mtimes or link counts: s3fs
reports ``nlink = 1`` and no folder mtime change when a file is added, gcsfuse keeps no
folder mtimes, NFS caches attributes. Each pass (every ``poll_seconds``) lists the input
root and each gateway folder (new study folders), and the listing of every *pending* study
(``is_pending``: the engine still has work on it, or never saw it); *finished* studies are
listed on a slower cadence, ``finished_seconds``, spread evenly over it (a ring, a few per
pass) rather than in bursts. A study whose listing differs from its last one is touched. So
the idle cost is bounded by the pending work and the number of gateways, not by history:
``(1 + gateways) x 60 / poll_seconds + finished x 60 / finished_seconds`` folder listings a
minute (one more per sub-folder of a study listed). A folder that cannot be listed (mount
away: ENOTCONN, EIO, ESTALE) keeps its last listing and is reported by :attr:`unreachable`.

Events for ``image.db`` touch nothing: the database only matters when a study's own files
settle, and those produce their own events. Symlinked gateway or study folders are not
followed. ``on_touch`` must be cheap (e.g. put the pair on a queue); its errors are logged,
never raised into watchdog.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from service.assembly import snapshot, study_uid_from_folder
from service.config import GATEWAY_ID_RE, WATCH_MODES
from service.errors import TransientError
from service.values import Snapshot

logger = logging.getLogger(__name__)

GATEWAY_PREFIX = "gateway_"
#: Events that mean content changed; opened/closed-no-write are our own reads.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
]
_EVENT_TYPES = frozenset(cls.event_type for cls in _EVENTS)
_MAX_DEPTH = 8

Signature = tuple[tuple[str, int], ...]


def gateway_id_from_folder(name: str) -> str | None:
    """``<id>`` of a folder named ``gateway_<id>`` with a valid id, else None."""
    if not name.startswith(GATEWAY_PREFIX):
        return None
    gateway_id = name[len(GATEWAY_PREFIX) :]
    return gateway_id if GATEWAY_ID_RE.match(gateway_id) else None


class StudyWatcher:
    """Calls ``on_touch(gateway_id, study_folder_name)`` when a study folder may have changed."""

    def __init__(
        self,
        input_root: Path,
        on_touch: Callable[[str, str], None],
        *,
        mode: str = "native",
        rescan_seconds: float = 30.0,
        poll_seconds: float = 2.0,
        full_rescan_seconds: float | None = None,
        finished_seconds: float = 300.0,
        is_pending: Callable[[str, str], bool] | None = None,
    ) -> None:
        if mode not in WATCH_MODES:
            raise ValueError(f"watch mode must be one of {', '.join(WATCH_MODES)}; got {mode!r}")
        self.input_root = Path(input_root)
        self.on_touch = on_touch
        self.mode = mode
        self.interval = poll_seconds if mode == "polling" else rescan_seconds
        if full_rescan_seconds is None:
            full_rescan_seconds = rescan_seconds * (1 if mode == "polling" else 10)
        self.full_rescan_seconds = full_rescan_seconds
        self._signatures: dict[tuple[str, str], Signature] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._last_full = 0.0
        # polling mode: listing digest per study, finished studies in a ring (listed a few
        # per pass), the pass's share of the ring not yet listed, the last pass's time
        self.finished_seconds = max(finished_seconds, self.interval)
        self._is_pending = is_pending
        self._listings: dict[tuple[str, str], bytes] = {}
        self._ring: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._credit = 0.0
        self._last_poll = 0.0
        #: why INPUT (or a gateway folder in it) could not be listed by the last pass; ""
        self.unreachable = ""
        #: folder listings made by polling passes (for benches and tests)
        self.listings_made = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Touch every existing study folder (the backlog), then watch in the background."""
        self._stop.clear()
        if self.mode == "native":
            self._start_observer()
        if self.mode == "polling" and self._last_poll:
            self.poll()  # scanned already: only what changed since (no events to miss)
        else:
            self.scan()
        self._thread = threading.Thread(target=self._loop, name="study-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and join the threads."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

    def _start_observer(self) -> None:
        if self._observer is not None:
            return
        if not self.input_root.is_dir():
            logger.warning("input folder %s does not exist yet; rescanning", self.input_root)
            return
        observer = Observer()
        try:
            observer.schedule(
                _Handler(self), str(self.input_root), recursive=True, event_filter=_EVENTS
            )
            observer.daemon = True
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit (fs.inotify.max_user_watches)
            logger.warning(
                "cannot watch %s natively (%s); relying on rescans every %.1f s",
                self.input_root,
                exc.strerror or exc,
                self.interval,
            )
            return
        self._observer = observer

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.mode == "native":
                    self._start_observer()  # in case the input root appeared late
                if self.mode == "polling":
                    self.poll()  # listings are compared: no blind full pass is needed
                elif time.monotonic() - self._last_full >= self.full_rescan_seconds:
                    self.scan()
                else:
                    self.poll()
            except Exception:
                logger.exception("watcher pass failed; retrying in %.1f s", self.interval)

    # -- passes ----------------------------------------------------------------------------

    def scan(self, now: float | None = None) -> None:
        """One full pass: touch every study folder of every gateway."""
        self._pass(full=True, now=now)

    def poll(self, now: float | None = None) -> None:
        """One cheap pass: touch only study folders that are new or changed (``now``: the
        monotonic time of the pass, for tests)."""
        self._pass(full=False, now=now)

    def _pass(self, full: bool, now: float | None = None) -> None:
        if self.mode == "polling":
            self._listing_pass(full, time.monotonic() if now is None else now)
            return
        with self._lock:
            if full:
                self._last_full = time.monotonic()
            seen: dict[tuple[str, str], Signature] = {}
            for gateway_id, name, path in self._study_folders():
                key = (gateway_id, name)
                try:
                    seen[key] = _signature(path)
                except OSError:
                    continue  # vanished meanwhile
                if full or self._signatures.get(key) != seen[key]:
                    self._touch(gateway_id, name)
            self._signatures = seen

    # -- polling: listings only ------------------------------------------------------------

    def _listing_pass(self, full: bool, now: float) -> None:
        """Touch new studies and studies whose listing changed: pending ones every pass,
        finished ones (all with ``full``) a share of the ring per pass."""
        with self._lock:
            elapsed = self.interval if not self._last_poll else now - self._last_poll
            self._last_poll = now
            present, errors = self._listed_studies()
            self.unreachable = "; ".join(errors)
            for key in [k for k in self._listings if k not in present]:
                del self._listings[key]  # gone (a gateway that cannot be listed keeps its own)
                self._ring.pop(key, None)
            pending = self._is_pending or (lambda _gid, _name: True)
            finished: list[tuple[str, str]] = []
            for key, path in present.items():
                if full or key not in self._listings or pending(*key):
                    self._look(key, path, touch_always=full)
                else:
                    finished.append(key)
            if full or not finished:
                self._credit = 0.0
                return
            share = self._credit + len(finished) * elapsed / self.finished_seconds
            count = min(int(share), len(finished))
            self._credit = share - count if count < len(finished) else 0.0
            done: set[tuple[str, str]] = set()
            finished_set = set(finished)
            for key in list(self._ring):
                if len(done) >= count:
                    break
                self._ring.move_to_end(key)
                if key in finished_set:
                    done.add(key)
                    self._look(key, present[key], touch_always=False)

    def _listed_studies(self) -> tuple[dict[tuple[str, str], Path], list[str]]:
        """Study folders now present; studies of a gateway that cannot be listed are kept
        as they were (their last listing stands), and the errors say why."""
        present: dict[tuple[str, str], Path] = {}
        errors: list[str] = []
        try:
            gateways = _listdirs(self.input_root)
            self.listings_made += 1
        except OSError as exc:
            errors.append(f"INPUT cannot be listed: {exc.strerror or exc}")
            gateways = []
            for key in self._listings:
                present[key] = self.input_root / f"{GATEWAY_PREFIX}{key[0]}" / key[1]
        for gateway in gateways:
            gateway_id = gateway_id_from_folder(gateway.name)
            if gateway_id is None:
                continue
            try:
                studies = _listdirs(Path(gateway.path))
                self.listings_made += 1
            except OSError as exc:
                errors.append(f"INPUT/{gateway.name} cannot be listed: {exc.strerror or exc}")
                for key in self._listings:
                    if key[0] == gateway_id:
                        present[key] = Path(gateway.path) / key[1]
                continue
            for study in studies:
                if self._study_name(study.name) is not None:
                    present[(gateway_id, study.name)] = Path(study.path)
        return present, errors

    def _look(self, key: tuple[str, str], path: Path, touch_always: bool) -> None:
        """List one study folder; touch it when new, changed or ``touch_always``."""
        try:
            snap = snapshot(path, self.input_root)
        except TransientError as exc:  # mount away: its last listing stands
            logger.debug("cannot list study folder %s: %s", key[1], exc)
            return
        finally:
            self.listings_made += 1
        digest = _digest(snap)
        changed = self._listings.get(key) != digest
        self._listings[key] = digest
        if key not in self._ring:
            self._ring[key] = None
        if changed or touch_always:
            self._touch(*key)

    def _study_folders(self) -> Iterator[tuple[str, str, Path]]:
        for gateway in _subdirs(self.input_root):
            gateway_id = gateway_id_from_folder(gateway.name)
            if gateway_id is None:
                continue
            for study in _subdirs(Path(gateway.path)):
                if self._study_name(study.name) is not None:
                    yield gateway_id, study.name, Path(study.path)

    def _study_name(self, name: str) -> str | None:
        if name.startswith("."):
            return None
        study = study_uid_from_folder(name)
        if study is None and name not in self._warned:
            self._warned.add(name)
            logger.warning("ignoring study folder with an unusable name %r", name[:100])
        return study

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _EVENT_TYPES:
            return
        touched: set[tuple[str, str]] = set()
        for raw in (event.src_path, event.dest_path):
            if raw:
                pair = self._study_of(os.fsdecode(raw), event.is_directory)
                if pair is not None:
                    touched.add(pair)
        for gateway_id, name in sorted(touched):
            self._touch(gateway_id, name)

    def _study_of(self, path: str, is_directory: bool) -> tuple[str, str] | None:
        """(gateway id, study folder name) of a path under a study folder, else None."""
        try:
            parts = Path(path).relative_to(self.input_root).parts
        except ValueError:
            return None
        if len(parts) < 2:
            return None  # the input root or a gateway folder itself
        gateway_id = gateway_id_from_folder(parts[0])
        if gateway_id is None or (len(parts) == 2 and parts[1] == "image.db"):
            return None
        name = self._study_name(parts[1])
        if name is None or (len(parts) == 2 and not is_directory):
            return None  # a file directly in the gateway folder, not in a study folder
        return gateway_id, name

    def _touch(self, gateway_id: str, name: str) -> None:
        try:
            self.on_touch(gateway_id, name)
        except Exception:
            logger.exception("on_touch failed for gateway %s study %s", gateway_id, name)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: StudyWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self.watcher._on_event(event)
        except Exception:  # never raise into watchdog's thread
            logger.exception("error handling file-system event")


def _listdirs(folder: Path) -> list[os.DirEntry[str]]:
    """Real sub-folders of ``folder``; [] when it does not exist; other errors raise."""
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _digest(snap: Snapshot) -> bytes:
    """A digest of a study's listing (paths, sizes, mtimes)."""
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(snap):
        state = snap[rel]
        line = f"{rel}\0{state.size}\0{state.mtime_ns}\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.digest()


def _subdirs(folder: Path) -> list[os.DirEntry[str]]:
    """Real (not symlinked) sub-folders of ``folder``; empty when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _signature(folder: Path) -> Signature:
    """mtimes of ``folder`` and its sub-folders: changes when any entry is added or renamed.

    A folder whose link count is 2 has no sub-folders (POSIX file systems; others report 1),
    so it is not even listed.
    """
    result: list[tuple[str, int]] = []
    pending: list[tuple[Path, str, int]] = [(folder, "", 0)]
    while pending:
        path, rel, depth = pending.pop()
        st = os.stat(path, follow_symlinks=False)
        result.append((rel, st.st_mtime_ns))
        if st.st_nlink == 2 or depth >= _MAX_DEPTH:
            continue
        for entry in _subdirs(path):
            pending.append((Path(entry.path), f"{rel}/{entry.name}", depth + 1))
    return tuple(sorted(result))
