"""StudyWatcher on a real temporary INPUT tree, with real inotify and real polling threads."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.watcher import StudyWatcher, gateway_id_from_folder

STUDY = "1.2.826.0.1.3680043.8.498.1"
DEADLINE = 20.0  # generous: a wait limit, not a timing assertion


class Touches:
    """Thread-safe record of on_touch calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, gateway_id: str, study: str) -> None:
        with self.lock:
            self.calls.append((gateway_id, study))

    def seen(self) -> set[tuple[str, str]]:
        with self.lock:
            return set(self.calls)

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()

    def wait_for(self, pair: tuple[str, str]) -> bool:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if pair in self.seen():
                return True
            time.sleep(0.05)
        return False


@pytest.fixture
def running() -> Iterator[Callable[..., StudyWatcher]]:
    watchers: list[StudyWatcher] = []

    def start(root: Path, touches: Touches, **kwargs: object) -> StudyWatcher:
        watcher = StudyWatcher(root, touches, **kwargs)  # type: ignore[arg-type]
        watcher.start()
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()


def test_native_mode_sees_a_new_gateway_and_study(
    tmp_path: Path, running: Callable[..., StudyWatcher]
) -> None:
    touches = Touches()
    # Rescans effectively off: only inotify can deliver the event.
    running(tmp_path, touches, mode="native", rescan_seconds=3600)
    assert touches.seen() == set()
    study = tmp_path / "gateway_7" / STUDY / "series"
    study.mkdir(parents=True)
    (study / "1.2.3.4").write_bytes(b"data")
    assert touches.wait_for(("7", STUDY))
    assert all(call == ("7", STUDY) for call in touches.seen())


def test_native_mode_sees_in_place_rewrite(
    tmp_path: Path, running: Callable[..., StudyWatcher]
) -> None:
    folder = tmp_path / "gateway_1" / STUDY
    folder.mkdir(parents=True)
    (folder / "f").write_bytes(b"old")
    touches = Touches()
    running(tmp_path, touches, mode="native", rescan_seconds=3600)
    assert touches.seen() == {("1", STUDY)}  # the backlog
    touches.clear()
    with open(folder / "f", "r+b") as fh:
        fh.write(b"new")
    assert touches.wait_for(("1", STUDY))


def test_polling_mode_sees_a_new_study(
    tmp_path: Path, running: Callable[..., StudyWatcher]
) -> None:
    (tmp_path / "gateway_2").mkdir()
    touches = Touches()
    running(tmp_path, touches, mode="polling", poll_seconds=0.1, rescan_seconds=3600)
    folder = tmp_path / "gateway_2" / STUDY
    folder.mkdir()
    (folder / "x").write_bytes(b"x")
    assert touches.wait_for(("2", STUDY))


def _tree(root: Path) -> None:
    for gateway in ("1", "2"):
        for n in range(3):
            folder = root / f"gateway_{gateway}" / f"1.2.3.{n}" / "sub"
            folder.mkdir(parents=True)
            (folder / "file").write_bytes(b"x")
        (root / f"gateway_{gateway}" / "image.db").write_bytes(b"")
    (root / "not-a-gateway" / "1.2.3").mkdir(parents=True)
    (root / "gateway_bad id" / "1.2.3").mkdir(parents=True)


def test_scan_touches_backlog_then_idle_polls_touch_nothing(tmp_path: Path) -> None:
    _tree(tmp_path)
    touches = Touches()
    watcher = StudyWatcher(tmp_path, touches, mode="polling")
    watcher.scan()
    expected = {(g, f"1.2.3.{n}") for g in ("1", "2") for n in range(3)}
    assert touches.seen() == expected and len(touches.calls) == 6
    touches.clear()
    watcher.poll()
    watcher.poll()
    assert touches.calls == []
    # A new file in a deep sub-folder changes only that study's signature.
    (tmp_path / "gateway_2" / "1.2.3.1" / "sub" / "new").write_bytes(b"n")
    watcher.poll()
    assert touches.calls == [("2", "1.2.3.1")]
    touches.clear()
    watcher.scan()  # a full pass touches all again (catches in-place rewrites)
    assert touches.seen() == expected


def test_hostile_study_folder_names_ignored_with_a_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = tmp_path / "gateway_3"
    for name in ("ctl\x01char", "9" * 65, STUDY):
        (gateway / name).mkdir(parents=True)
    touches = Touches()
    watcher = StudyWatcher(tmp_path, touches, mode="polling")
    with caplog.at_level(logging.WARNING, logger="service.watcher"):
        watcher.scan()
        watcher.scan()
    assert touches.calls == [("3", STUDY), ("3", STUDY)]
    warnings = [r.getMessage() for r in caplog.records if "unusable name" in r.getMessage()]
    assert len(warnings) == 2  # once per name, not once per pass


def test_failing_callback_does_not_stop_the_watcher(
    tmp_path: Path, running: Callable[..., StudyWatcher]
) -> None:
    touches = Touches()

    def flaky(gateway_id: str, study: str) -> None:
        touches(gateway_id, study)
        raise RuntimeError("consumer bug")

    running(tmp_path, flaky, mode="native", rescan_seconds=3600)
    for n in (1, 2):
        folder = tmp_path / "gateway_1" / f"1.2.{n}"
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(b"f")
        assert touches.wait_for(("1", f"1.2.{n}"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gateway_1", "1"),
        ("gateway_a-B_9", "a-B_9"),
        ("gateway_", None),
        ("gw_1", None),
        ("gateway_x/y", None),
        ("gateway_" + "1" * 65, None),
    ],
)
def test_gateway_folder_names(name: str, expected: str | None) -> None:
    assert gateway_id_from_folder(name) == expected


def _studies(root: Path, count: int) -> list[tuple[str, str]]:
    for n in range(count):
        folder = root / "gateway_1" / f"1.2.3.{n}" / "series"
        folder.mkdir(parents=True)
        (folder / "file").write_bytes(b"x")
    return [("1", f"1.2.3.{n}") for n in range(count)]


def test_polling_lists_pending_studies_every_pass_and_finished_ones_spread(
    tmp_path: Path,
) -> None:
    """20 finished studies, cadence 10 s, a pass every 1 s: 2 finished studies listed per
    pass, each once per 10 passes; the pending study every pass."""
    keys = _studies(tmp_path, 21)
    pending = {keys[0]}
    touches = Touches()
    watcher = StudyWatcher(
        tmp_path,
        touches,
        mode="polling",
        poll_seconds=1.0,
        finished_seconds=10.0,
        is_pending=lambda gid, name: (gid, name) in pending,
    )
    watcher.scan(now=100.0)
    assert len(touches.calls) == 21
    touches.clear()
    per_pass = []
    for n in range(1, 11):
        before = watcher.listings_made
        watcher.poll(now=100.0 + n)
        per_pass.append(watcher.listings_made - before - 2)  # less the root and gateway_1
    assert per_pass == [3] * 10  # the pending study + 2 finished ones, no burst
    assert touches.calls == []  # nothing changed
    # a late file in a finished study is found within the cadence (10 passes), the pending
    # study's at the next pass
    (tmp_path / "gateway_1" / "1.2.3.7" / "series" / "late").write_bytes(b"late")
    (tmp_path / "gateway_1" / "1.2.3.0" / "series" / "more").write_bytes(b"more")
    watcher.poll(now=111.0)
    assert ("1", "1.2.3.0") in touches.calls
    for n in range(12, 22):
        watcher.poll(now=100.0 + n)
    assert touches.calls.count(("1", "1.2.3.7")) == 1
    assert touches.calls.count(("1", "1.2.3.0")) == 1


def test_polling_trusts_listings_not_folder_mtimes(tmp_path: Path) -> None:
    """A file added with the folder's mtime put back (as s3fs and gcsfuse report folders)
    is still found: polling compares listings."""
    keys = _studies(tmp_path, 1)
    series = tmp_path / "gateway_1" / keys[0][1] / "series"
    touches = Touches()
    watcher = StudyWatcher(tmp_path, touches, mode="polling", is_pending=lambda *_: True)
    watcher.scan(now=1.0)
    touches.clear()
    st = series.stat()
    (series / "added").write_bytes(b"a")
    os.utime(series, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(series.parent, ns=(st.st_atime_ns, st.st_mtime_ns))
    watcher.poll(now=3.0)
    assert touches.calls == [keys[0]]
