"""Watching cost on a big idle backlog: ``python bench/watch.py [--studies 1000] [--idle 60]``.

Makes ``--studies`` study folders of ``--files`` tiny junk files each under INPUT/gateway_1
(the service lists and stats them; as junk they end ``skipped``, so afterwards the service
is idle), then for each watch mode runs ``python main.py serve`` and measures:

* start-up: from process start until every backlog study is finished in the ledger
  (the first pass lists, inspects and records every file once); on a restart, until the
  service's heartbeat says its queue is empty (finished, unchanged studies are not read);
* idle CPU of the service process over ``--idle`` seconds (utime + stime from /proc);
* time to notice a new study: from the drop of a real DICOM file into a new study folder
  until the ledger has a row for it.

Native mode (inotify + rescan every 30 s, full pass every 300 s) runs first on a fresh
ledger; polling mode (poll_seconds=2, full pass every 30 s) then restarts on the same ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    StagedStudy,
    cpu_seconds,
    ledger,
    reidentify,
    start_service,
    stop_process,
    wait_until,
)
from devtools.sample import pydicom_file
from tests import helpers

UID_PREFIX = "1.2.826.0.1.3680043.8.498.77."


def make_backlog(gateway: Path, studies: int, files: int) -> None:
    for s in range(studies):
        folder = gateway / f"{UID_PREFIX}{s + 1}"
        folder.mkdir(parents=True)
        for f in range(files):
            (folder / f"{f:04d}").write_bytes(b"junk\n")


def write_config(folder: Path, mode: str, poll: float) -> Path:
    path = helpers.write_config(
        folder,
        stable=1,
        watch=mode,
        rescan_seconds=30,
        poll_seconds=poll,
        log_level="WARNING",
    )
    return path.rename(folder / f"{mode}.toml")


def first_pass_done(state: Path, since: float, studies: int, files: int) -> bool:
    """Every backlog file recorded since ``since`` and every backlog study finished."""
    rows = ledger(state, "SELECT COUNT(*) AS n FROM instances WHERE updated >= ?", (since,))
    if not rows or rows[0]["n"] < studies * files:
        return False
    rows = ledger(state, "SELECT COUNT(*) AS n FROM studies WHERE state IN ('skipped', 'written')")
    return bool(rows) and rows[0]["n"] >= studies


def queue_empty(state: Path, since: float) -> bool:
    """The service's heartbeat, written since ``since``, says nothing is pending or running."""
    beat = state / "heartbeat"
    try:
        info = json.loads(beat.read_text()) if beat.stat().st_mtime >= since else None
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and bool(info) and not any(info.values())


def run_mode(
    folder: Path, mode: str, poll: float, studies: int, files: int, idle: float
) -> dict[str, float]:
    """One ``serve`` process: on a fresh ledger it reads the whole backlog; on a restart
    the ledger's listings of finished studies leave it at one listing per study."""
    state = folder / "STATE"
    config = write_config(folder, mode, poll)
    fresh = not (state / "ledger.sqlite3").exists()
    started, since = time.monotonic(), time.time()
    proc = start_service(config, folder / f"{mode}.log")
    try:
        wait_until(
            lambda: (
                first_pass_done(state, since, studies, files)
                if fresh
                else queue_empty(state, since)
            ),
            1800,
            "the backlog",
            step=0.2,
        )
        startup = time.monotonic() - started
        startup_cpu = cpu_seconds(proc.pid)
        time.sleep(5.0)  # let the last ticks settle
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle)
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        source = pydicom_file("CT_small.dcm")
        ds = reidentify(source, generate_uid(), generate_uid())
        study = StagedStudy("1", "new", [ds], folder / f"staging-{mode}")
        study.drop(folder / "INPUT")
        wait_until(
            lambda: bool(
                ledger(state, "SELECT 1 FROM studies WHERE study_uid=?", (study.study_uid,))
            ),
            120,
            "the new study",
            step=0.02,
        )
        noticed = time.time() - study.dropped_at
    finally:
        code = stop_process(proc)
    if code:
        print((folder / f"{mode}.log").read_text()[-3000:])
        raise RuntimeError(f"service exited with {code}")
    return {
        "startup_s": startup,
        "startup_cpu_s": startup_cpu,
        "idle_cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
        "noticed_s": noticed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--poll", type=float, default=2.0)
    args = parser.parse_args()
    watches = Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        folder = Path(tmp)
        t0 = time.monotonic()
        make_backlog(folder / "INPUT" / "gateway_1", args.studies, args.files)
        made = time.monotonic() - t0
        results = {
            "native": run_mode(folder, "native", args.poll, args.studies, args.files, args.idle),
            "polling": run_mode(folder, "polling", args.poll, args.studies, args.files, args.idle),
        }
    total = args.studies * args.files
    print(f"Watching benchmark: {args.studies} study folders x {args.files} files = {total} files")
    print(f"(junk, made in {made:.0f} s: each file inspected and recorded, each study skipped)")
    print(f"fs.inotify.max_user_watches={watches}; idle window {args.idle:g} s")
    print(f"{'mode':<28}{'start-up s':>11}{'start CPU s':>12}{'idle CPU %':>11}{'notice s':>9}")
    labels = {
        "native": "native (fresh ledger)",
        "polling": f"polling {args.poll:g} s (restart)",
    }
    for mode, r in results.items():
        print(
            f"{labels[mode]:<28}{r['startup_s']:>11.1f}{r['startup_cpu_s']:>12.1f}"
            f"{r['idle_cpu_pct']:>11.2f}{r['noticed_s']:>9.2f}"
        )
    print("goals: idle CPU < 1 % native, < 5 % polling at 2 s; notice within 2 poll intervals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
