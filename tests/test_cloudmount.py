"""The service on a real cloud mount: INPUT and OUTPUT on s3fs (FUSE) over moto's S3 server.

Studies are uploaded through the S3 API (boto3) as another host would; requests are counted
in the server's log. Skipped, with the reason, where /dev/fuse or s3fs is absent.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.cloudmount import S3Mount
from tests.conftest import shared_file
from tests.helpers import ROOT, ledger_rows, wait_for, write_config
from tests.test_faults import CountingScp


def upload_series(
    mount: S3Mount, src: Path, prefix: str, limit: int | None = None
) -> tuple[str, list[str]]:
    """Upload real DICOM files to ``<prefix>/<StudyUID>/<SOPUID>`` through the S3 API."""
    client = mount.server.client()
    study_uid, keys = "", []
    for path in sorted(p for p in src.rglob("*") if p.is_file())[:limit]:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        study_uid = str(ds.StudyInstanceUID)
        key = f"{prefix}/{study_uid}/{ds.SOPInstanceUID}"
        client.put_object(Bucket=mount.bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return study_uid, keys


def states(state_dir: Path) -> dict[str, str]:
    rows = ledger_rows(state_dir, "SELECT study_uid, state FROM studies")
    return {r["study_uid"]: r["state"] for r in rows}


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Any]:
    """Starts ``serve`` with its log in a file (a long run must not fill a pipe)."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(config: Path) -> subprocess.Popen[bytes]:
        log = tmp_path / f"service-{len(procs)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), "--config", str(config), "serve"],
                cwd=ROOT,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        procs.append((proc, log))
        return proc

    yield start
    for proc, _log in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def mount_config(tmp_path: Path, mnt: Path, extra: str = "", **service: float) -> Path:
    settings: dict[str, Any] = {
        "input_dir": str(mnt / "INPUT"),
        "output_dir": str(mnt / "OUTPUT"),
        "watch": "polling",
        **service,
    }
    return write_config(tmp_path, extra, 0.5, **settings)


def test_idle_cost_with_100_finished_studies_is_bounded_by_pending_work(
    tmp_path: Path, s3_mount: S3Mount, service: Any
) -> None:
    """100 finished studies, defaults (a pass every 2 s, finished studies once per 300 s):
    at most 100 LIST requests per idle minute (1529 when every pass listed every study);
    a new study is still noticed and run."""
    client = s3_mount.server.client()
    uids = [f"1.2.826.0.1.3680043.10.999.5.{n}" for n in range(100)]
    for uid in uids:  # not DICOM: each study ends `skipped`, i.e. finished, quickly
        client.put_object(Bucket=s3_mount.bucket, Key=f"INPUT/gateway_1/{uid}/f", Body=b"x")
    config = mount_config(
        tmp_path, s3_mount.path, poll_seconds=2, rescan_seconds=30, finished_poll_seconds=300
    )
    state = tmp_path / "STATE"
    proc = service(config)
    wait_for(lambda: sum(s == "skipped" for s in states(state).values()) == 100, 120, "finished")
    time.sleep(3)  # the last looks settle
    before = s3_mount.server.lists()
    window = 30.0
    time.sleep(window)
    idle = s3_mount.server.lists() - before
    per_minute = idle * 60 / window
    # the cost model: (1 + gateways) x 60/poll + finished x 60/finished_poll (+ discovery)
    model = (1 + 1) * 60 / 2 + 100 * 60 / 300 + 60 / 30
    new_uid, _ = upload_series(s3_mount, shared_file("series/ct-4-noise"), "INPUT/gateway_1", 1)
    wait_for(lambda: states(state).get(new_uid) == "written", 90, "the new study written")
    assert proc.poll() is None
    assert 0 < per_minute <= 100, per_minute
    assert per_minute <= model * 1.2, (per_minute, model)


def test_late_file_in_a_finished_study_is_found_within_the_finished_cadence(
    tmp_path: Path, s3_mount: S3Mount, service: Any
) -> None:
    """A file added (through S3, the folder's mtime unchanged on s3fs) to a study that was
    written is found within ``finished_poll_seconds``: a second run with both files."""
    src = shared_file("series/ct-4-noise")
    files = sorted(src.iterdir())[:2]
    client = s3_mount.server.client()
    ds = dcmread(files[0], stop_before_pixels=True)
    study = str(ds.StudyInstanceUID)
    for n in range(8):  # other finished studies share the ring
        client.put_object(
            Bucket=s3_mount.bucket, Key=f"INPUT/gateway_1/1.2.826.0.1.3680043.10.999.6.{n}/f"
        )
    client.put_object(
        Bucket=s3_mount.bucket,
        Key=f"INPUT/gateway_1/{study}/{ds.SOPInstanceUID}",
        Body=files[0].read_bytes(),
    )
    cadence = 10.0
    config = mount_config(tmp_path, s3_mount.path, poll_seconds=1, finished_poll_seconds=cadence)
    state = tmp_path / "STATE"
    service(config)
    wait_for(lambda: states(state).get(study) == "written", 90, "the first run")
    wait_for(lambda: len(states(state)) == 9, 60, "the other studies")
    time.sleep(2)
    second = dcmread(files[1], stop_before_pixels=True)
    client.put_object(
        Bucket=s3_mount.bucket,
        Key=f"INPUT/gateway_1/{study}/series-2/{second.SOPInstanceUID}",
        Body=files[1].read_bytes(),
    )
    uploaded = time.monotonic()
    # noticed: the study leaves `written` (receiving, then a new run); within the cadence
    # plus one pass and a second's slack for the listing itself
    wait_for(lambda: states(state).get(study) != "written", cadence + 2 + 1, "noticed")
    noticed = time.monotonic() - uploaded
    wait_for(lambda: states(state).get(study) == "written", 90, "the second run")
    runs = ledger_rows(state, "SELECT run_id, n_inputs FROM runs ORDER BY run_id")
    assert noticed <= cadence + 3
    assert [r["n_inputs"] for r in runs] == [1, 2]


def _health(config: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config), "status", "--health"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_a_5_s_mount_outage_during_a_run_ends_sent(
    tmp_path: Path, s3_mount: S3Mount, service: Any
) -> None:
    """s3fs killed (ENOTCONN) for 5 s while a study runs, then mounted again: the study
    waits (never failed), health says INPUT and OUTPUT are unreachable, and the same run
    ends `sent` with one association."""
    scp = CountingScp()
    try:
        pacs = f'[pacs]\nhost = "127.0.0.1"\nport = {scp.port}\nae_title = "{scp.ae_title}"\n'
        study, keys = upload_series(
            s3_mount, shared_file("series/ct-4-noise"), "INPUT/gateway_1", 3
        )
        config = mount_config(tmp_path, s3_mount.path, pacs, poll_seconds=1)
        state = tmp_path / "STATE"
        proc = service(config)
        seen: set[str] = set()

        def watch() -> None:
            while proc.poll() is None:
                seen.update(states(state).values())
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wait_for(lambda: states(state).get(study) in ("ready", "running"), 90, "a run")
        s3_mount.kill()
        away = time.monotonic()
        health_away = (0, "")
        while health_away[0] == 0 and time.monotonic() - away < 15:  # a heartbeat is 5 s
            health_away = _health(config)
        time.sleep(max(0.0, 5.0 - (time.monotonic() - away)))  # away for at least 5 s
        s3_mount.remount()
        wait_for(lambda: states(state).get(study) == "sent", 120, "sent after the outage")
        wait_for(lambda: _health(config)[0] == 0, 30, "healthy again")
    finally:
        scp.shutdown()
    runs = ledger_rows(state, "SELECT state FROM runs")
    assert [r["state"] for r in runs] == ["sent"]
    assert "failed" not in seen and "skipped" not in seen
    assert scp.associations == 1 and len(scp.stored) == 3
    assert health_away[0] == 1 and "INPUT unreachable" in health_away[1], health_away
    assert "OUTPUT unreachable" in health_away[1]
    assert len(keys) == 3


def test_wal_image_db_on_a_read_only_mount_is_read_not_ignored(
    tmp_path: Path, s3_mount: S3Mount
) -> None:
    """image.db in WAL mode, uploaded with its -wal by the gateway app's host, on a
    read-only s3fs mount: SQLite cannot open it in place; the service's local snapshot
    reads it, the newest rows (only in the -wal) included, and writes nothing there."""
    from service.imagedb import ImageDb
    from tests.test_imagedb import wal_db_with_pending_frames

    app = tmp_path / "app"
    app.mkdir()
    writer, study, sop = wal_db_with_pending_frames(app)
    client = s3_mount.server.client()
    try:
        for name in ("image.db", "image.db-wal"):
            body = (app / name).read_bytes()
            client.put_object(Bucket=s3_mount.bucket, Key=f"INPUT/gateway_1/{name}", Body=body)
    finally:
        writer.close()
    ro = S3Mount(s3_mount.server, s3_mount.bucket, tmp_path / "ro", tmp_path, ("ro",))
    try:
        path = ro.path / "INPUT/gateway_1/image.db"
        in_place = ImageDb(path)
        assert in_place.expected_instances(study) is None  # what happened before
        snapshot = ImageDb(path, copy_dir=tmp_path / "copies")
        found = snapshot.expected_instances(study)
    finally:
        ro.close()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_mount.bucket)["Contents"]]
    assert "unable to open" in in_place.last_error, in_place.last_error
    assert found == {sop}, snapshot.last_error
    assert sorted(keys) == ["INPUT/gateway_1/image.db", "INPUT/gateway_1/image.db-wal"]


def test_output_written_through_s3fs_never_shows_a_partial_final_object(
    tmp_path: Path, s3_mount: S3Mount
) -> None:
    """What a consumer listing the bucket sees while the service writes an output through
    s3fs (temp file, fsync, rename = server-side copy + delete): under the final name only
    the complete object; anything else only under the `.tmp-` name, which it must skip."""
    import os

    from service.fsutil import TMP_PREFIX, atomic_write

    client = s3_mount.server.client()
    payload = os.urandom(2 * 1024 * 1024)
    final_key = "OUTPUT/gateway_1/1.2.3/1.2.3.4.dcm"
    seen: list[tuple[str, int, str]] = []
    done = threading.Event()

    def consumer() -> None:
        while not done.is_set():
            listed = client.list_objects_v2(Bucket=s3_mount.bucket, Prefix="OUTPUT/")
            seen.extend((o["Key"], o["Size"], o["ETag"]) for o in listed.get("Contents", []))

    thread = threading.Thread(target=consumer, daemon=True)
    thread.start()
    try:
        atomic_write(s3_mount.path / final_key, lambda fh: fh.write(payload))
        time.sleep(0.5)
    finally:
        done.set()
        thread.join()
    head = client.head_object(Bucket=s3_mount.bucket, Key=final_key)
    listed = client.list_objects_v2(Bucket=s3_mount.bucket, Prefix="OUTPUT/")
    finals = {(size, etag) for key, size, etag in seen if key == final_key}
    others = {key.rsplit("/", 1)[-1] for key, _size, _etag in seen if key != final_key}
    assert head["ContentLength"] == len(payload)
    assert finals == {(len(payload), head["ETag"])}  # only ever the whole object
    assert all(name.startswith(TMP_PREFIX) for name in others if name), others
    assert [o["Key"] for o in listed["Contents"] if not o["Key"].endswith("/")] == [final_key]
