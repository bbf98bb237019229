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
ledger; polling mode (poll_seconds=2; listings only) then restarts on the same ledger.

``--mount`` runs the service on a real cloud mount instead: moto's S3 server on loopback,
mounted with s3fs (tests/cloudmount.py), INPUT and OUTPUT on it, ``watch = "polling"``;
the backlog (``--studies`` folders of one junk file, default 1000) is uploaded through the
S3 API as another host would. After the backlog is finished it measures, over ``--idle``
seconds: LIST requests per minute (the server's log), CPU of the service and of s3fs; then
the time to notice a new study (upload until its ledger row), a file added to a pending
study and a file added to a finished study (upload until the engine saw the listing
change: the run's recorded ``stable_at`` less ``stable_seconds``, ±1 s check step). The
baseline, in the same run: the same service restarted with ``finished_poll_seconds`` =
``poll_seconds`` (every study listed every pass, the cost before listings were split).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import Dataset
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
from tests.cloudmount import S3Mount, S3Server, skip_reason

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
    queue = ("pending", "running", "sending")
    return isinstance(info, dict) and bool(info) and not any(info.get(k) for k in queue)


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


MOUNT_STABLE = 5.0  # seconds: long enough to add a file to a study still pending


def _mount_idle(
    folder: Path, mount: S3Mount, config: Path, idle: float, label: str
) -> tuple[subprocess.Popen[bytes], dict[str, float]]:
    """Start ``serve``; once the queue is empty measure LIST/min and CPU over ``idle`` s."""
    state = folder / "STATE"
    since = time.time()
    proc = start_service(config, folder / f"{label}.log")
    wait_until(lambda: queue_empty(state, since), 3600, "the backlog", step=0.5)
    time.sleep(5.0)
    lists0, cpu0, s3cpu0 = mount.server.lists(), cpu_seconds(proc.pid), _s3fs_cpu(mount)
    t0 = time.monotonic()
    time.sleep(idle)
    elapsed = time.monotonic() - t0
    lists = mount.server.lists() - lists0
    return proc, {
        "lists_per_min": lists * 60 / elapsed,
        "cpu_pct": (cpu_seconds(proc.pid) - cpu0) / elapsed * 100,
        "s3fs_cpu_pct": (_s3fs_cpu(mount) - s3cpu0) / elapsed * 100,
    }


def _s3fs_cpu(mount: S3Mount) -> float:
    assert mount.proc is not None
    return cpu_seconds(mount.proc.pid)


def _upload(mount: S3Mount, key: str, ds: Dataset) -> float:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    mount.server.client().put_object(Bucket=mount.bucket, Key=key, Body=buffer.getvalue())
    return time.time()


def _run_stable_at(state: Path, study_uid: str, runs: int) -> float | None:
    rows = ledger(state, "SELECT timings FROM runs WHERE study_uid=? ORDER BY run_id", (study_uid,))
    if len(rows) < runs:
        return None
    return float(json.loads(rows[runs - 1]["timings"]).get("stable_at", 0.0)) or None


def run_mount(args: argparse.Namespace) -> int:
    reason = skip_reason()
    if reason:
        sys.exit(f"cannot mount s3fs: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-watch-s3-") as tmp:
        folder = Path(tmp)
        server = S3Server(folder)
        mount: S3Mount | None = None
        try:
            client = server.client()
            client.create_bucket(Bucket="bench")
            t0 = time.monotonic()
            for s in range(args.studies):
                key = f"INPUT/gateway_1/{UID_PREFIX}{s + 1}/0000"
                client.put_object(Bucket="bench", Key=key, Body=b"junk\n")
            made = time.monotonic() - t0
            mount = S3Mount(server, "bench", folder / "mnt", folder)
            common = {
                "input_dir": str(mount.path / "INPUT"),
                "output_dir": str(mount.path / "OUTPUT"),
                "watch": "polling",
                "poll_seconds": args.poll,
                "rescan_seconds": 30,
                "log_level": "WARNING",
            }
            started = time.monotonic()
            config = helpers.write_config(
                folder, stable=MOUNT_STABLE, finished_poll_seconds=args.finished, **common
            ).rename(folder / "listings.toml")
            proc, ours = _mount_idle(folder, mount, config, args.idle, "listings")
            startup = time.monotonic() - started - args.idle - 5.0
            state = folder / "STATE"
            try:
                source = pydicom_file("CT_small.dcm")
                study_uid, series_uid = generate_uid(), generate_uid()
                prefix = f"INPUT/gateway_1/{study_uid}"
                first = reidentify(source, study_uid, series_uid, 1)
                dropped = _upload(mount, f"{prefix}/{first.SOPInstanceUID}", first)
                wait_until(
                    lambda: bool(
                        ledger(state, "SELECT 1 FROM studies WHERE study_uid=?", (study_uid,))
                    ),
                    120,
                    "the new study",
                    step=0.02,
                )
                new_study = time.time() - dropped
                time.sleep(1.0)  # pending: receiving, its quiet period running
                second = reidentify(source, study_uid, series_uid, 2)
                added = _upload(mount, f"{prefix}/{second.SOPInstanceUID}", second)
                wait_until(lambda: _run_stable_at(state, study_uid, 1) is not None, 120, "run 1")
                pending_file = (_run_stable_at(state, study_uid, 1) or 0) - MOUNT_STABLE - added
                wait_until(
                    lambda: bool(
                        ledger(
                            state,
                            "SELECT 1 FROM runs WHERE study_uid=? AND state='written'",
                            (study_uid,),
                        )
                    ),
                    120,
                    "run 1 written",
                )
                third = reidentify(source, study_uid, series_uid, 3)
                late = _upload(mount, f"{prefix}/sub/{third.SOPInstanceUID}", third)
                wait_until(
                    lambda: _run_stable_at(state, study_uid, 2) is not None,
                    args.finished + 120,
                    "run 2",
                )
                finished_file = (_run_stable_at(state, study_uid, 2) or 0) - MOUNT_STABLE - late
            finally:
                code = stop_process(proc)
            if code:
                raise RuntimeError(f"service exited with {code}")
            config = helpers.write_config(
                folder, stable=MOUNT_STABLE, finished_poll_seconds=args.poll, **common
            ).rename(folder / "baseline.toml")
            proc, base = _mount_idle(folder, mount, config, args.idle, "baseline")
            stop_process(proc)
        finally:
            if mount is not None:
                mount.close()
            server.stop()
    model = 2 * 60 / args.poll + (args.studies + 1) * 60 / args.finished + 60 / 30
    print(
        f"Watching on s3fs over moto (loopback): {args.studies} finished studies, "
        f"1 gateway, poll {args.poll:g} s, finished_poll_seconds {args.finished:g}"
    )
    print(f"(uploaded through S3 in {made:.0f} s; start-up until finished {startup:.0f} s)")
    print(f"{'':<44}{'LIST/min':>9}{'service CPU %':>14}{'s3fs CPU %':>11}")
    for label, r in (
        ("listings (pending every pass, finished spread)", ours),
        ("baseline: every study listed every pass", base),
    ):
        print(
            f"{label:<44}{r['lists_per_min']:>9.0f}{r['cpu_pct']:>14.2f}{r['s3fs_cpu_pct']:>11.2f}"
        )
    print(
        f"ratio LIST/min listings / baseline: {ours['lists_per_min'] / base['lists_per_min']:.3f}"
        f"; cost model {model:.0f}/min"
    )
    print(f"new study noticed after {new_study:.2f} s")
    print(f"file added to a pending study noticed after {pending_file:.2f} s")
    print(
        f"file added to a finished study noticed after {finished_file:.1f} s "
        f"(cadence {args.finished:g} s)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--poll", type=float, default=2.0)
    parser.add_argument("--mount", action="store_true", help="on s3fs over moto (see above)")
    parser.add_argument("--finished", type=float, default=300.0, help="finished_poll_seconds")
    args = parser.parse_args()
    if args.mount:
        return run_mount(args)
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
