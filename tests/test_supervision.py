"""Supervision as real processes: crash points at every transition, one service per STATE,
a ledger that cannot be written, names that are not UTF-8, health that tells the truth."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import shared_file
from tests.helpers import (
    copy_series,
    kill,
    ledger_rows,
    run_cli,
    start_service,
    stop_service,
    wait_for,
    write_config,
)
from tests.test_faults import CountingScp
from tests.test_notify import Hook


@pytest.fixture
def scp() -> Iterator[CountingScp]:
    server = CountingScp()
    yield server
    server.shutdown()


def _config(tmp_path: Path, scp: CountingScp) -> Path:
    return write_config(tmp_path, f"[pacs]\n{_pacs(scp)}", stable=0.3)


def _pacs(scp: CountingScp) -> str:
    return f'host = "127.0.0.1"\nport = {scp.port}\nae_title = "{scp.ae_title}"'


def _study_state(state: Path) -> tuple[str, str]:
    rows = ledger_rows(state, "SELECT state, reason FROM studies")
    return (rows[0]["state"], rows[0]["reason"]) if rows else ("", "")


def _died(proc: subprocess.Popen[str], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


# -- crash points -----------------------------------------------------------------------------

#: failpoint -> the study's final state after a restart, and the associations it may take
CRASH_POINTS = {
    "after-commit:receiving": ("sent", 1),
    "after-commit:running": ("sent", 1),  # the run is resumed with the same output UIDs
    "before-commit:written": ("sent", 1),  # rolled back: the run is still running
    "after-commit:written": ("sent", 1),  # the send was queued, never opened: it goes now
    "after-commit:sending": ("send_failed", 0),  # opened as far as the ledger knows
    "after-commit:sent": ("sent", 1),
}


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_sigkill_at_each_transition_ends_in_one_final_state(
    tmp_path: Path, scp: CountingScp, point: str
) -> None:
    config = _config(tmp_path, scp)
    copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_1", limit=2)
    state = tmp_path / "STATE"
    proc = start_service(config, env={"GATEWAY_FAILPOINTS": point})
    assert _died(proc, 120), f"failpoint {point} was never reached"
    _out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, _out
    outputs_before = {r["sop_instance_uid"] for r in ledger_rows(state, "SELECT * FROM outputs")}

    proc = start_service(config)
    expected, associations = CRASH_POINTS[point]
    try:
        wait_for(lambda: _study_state(state)[0] == expected, 60, f"study {expected}")
        time.sleep(1.5)  # a rescan must not change anything any more
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    runs = ledger_rows(state, "SELECT run_id, state FROM runs")
    assert len(runs) == 1, runs
    assert _study_state(state)[0] == expected
    assert scp.associations == associations
    outputs = {r["sop_instance_uid"] for r in ledger_rows(state, "SELECT * FROM outputs")}
    assert len(outputs) == 2 and outputs_before <= outputs  # same UIDs when resumed
    if expected == "sent":
        assert sorted(scp.stored) == sorted(outputs)
    else:
        assert "interrupted" in _study_state(state)[1]
    sends = ledger_rows(state, "SELECT state FROM sends")
    assert len(sends) == 1


# -- one service per STATE ------------------------------------------------------------------


def test_second_instance_on_the_same_state_exits_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "INPUT").mkdir()
    first = start_service(config)
    try:
        wait_for(lambda: (tmp_path / "STATE/heartbeat").exists(), 60, "the first service")
        second = start_service(config)
        assert _died(second, 60), "a second service on the same STATE kept running"
        out, _ = second.communicate()
        assert second.returncode == 1
        assert "already serving" in out and str(first.pid) in out
        assert first.poll() is None
    finally:
        code, log = stop_service(first)
    assert code == 0, log


# -- the service itself cannot go on ----------------------------------------------------------


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """STATE on a 1 MiB tmpfs (real ENOSPC, real read-only remounts)."""
    target = tmp_path / "STATE"
    target.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): " + proc.stderr.strip())
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _health(config: Path) -> tuple[int, str]:
    proc = run_cli("--config", str(config), "status", "--health")
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_unwritable_state_stops_the_service_with_exit_1(
    tmp_path: Path, small_state: Path, fault: str
) -> None:
    """... and announces it to the webhook (a real local HTTP server)."""
    hook = Hook()
    config = write_config(tmp_path, f'[notify]\nwebhook_url = "{hook.url}"\n')
    gw = tmp_path / "INPUT/gateway_1"
    copy_series(shared_file("series/ct-4-noise"), gw, limit=1)
    proc = start_service(config)
    try:
        wait_for(lambda: _study_state(small_state)[0] == "written", 60, "the first study")
        assert _health(config)[0] == 0
        if fault == "full":
            filler = small_state / "filler"
            with (
                filler.open("wb", buffering=0) as fh,
                pytest.raises(OSError),
            ):  # fill the rest of STATE
                while True:
                    fh.write(b"\0" * 65536)

        else:  # a busy file system cannot be remounted read-only: restart on it
            assert stop_service(proc)[0] == 0
            subprocess.run(["mount", "-o", "remount,ro", str(small_state)], check=True)
            proc = start_service(config)
        # new work must write the ledger
        for i in range(3):
            copy_series(shared_file("series/mr-phantom-63"), tmp_path / f"INPUT/gateway_{i + 2}")
        died = _died(proc, 90)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, _ = proc.communicate()
    assert died, f"the service kept running on a {fault} STATE: {out[-2000:]}"
    assert proc.returncode == 1, out
    assert "ledger.sqlite3" in out or str(small_state) in out, out
    code, message = _health(config)
    assert code == 1 and "unhealthy" in message, message
    hook.close()
    stopped = [b for b in hook.bodies if b["state"] == "service_stopped"]
    assert len(stopped) == 1, hook.bodies
    assert "ledger.sqlite3" in stopped[0]["reason"] or str(small_state) in stopped[0]["reason"]


def test_health_is_unhealthy_once_the_service_is_gone(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "INPUT").mkdir()
    proc = start_service(config)
    try:
        wait_for(lambda: _health(config)[0] == 0, 60, "a healthy service")
    finally:
        kill(proc)
    code, message = _health(config)  # at once: nobody holds the STATE lock any more
    assert code == 1 and "no service is running" in message, message


def test_health_says_output_unreachable_while_its_mount_is_away(tmp_path: Path) -> None:
    """OUTPUT is a mount point (a tmpfs); unmounted (an empty mount point left), health
    says so and exits 1; mounted again, healthy. Needs root for the mount."""
    output = tmp_path / "OUTPUT"
    output.mkdir()
    (tmp_path / "INPUT").mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(output)]
    mounted = subprocess.run(mount, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {mounted.stderr!r}")
    config = write_config(tmp_path)
    proc = start_service(config)
    try:
        wait_for(lambda: _health(config)[0] == 0, 60, "a healthy service")
        subprocess.run(["umount", "-l", str(output)], check=True)
        wait_for(lambda: _health(config)[0] == 1, 30, "unhealthy")
        away = _health(config)
        subprocess.run(mount, check=True)
        wait_for(lambda: _health(config)[0] == 0, 30, "healthy again")
    finally:
        code, log = stop_service(proc)
        subprocess.run(["umount", "-l", str(output)], capture_output=True)
    assert code == 0, log
    assert "OUTPUT unreachable: its mount point is no longer mounted" in away[1], away


# -- names that are not UTF-8 -------------------------------------------------------------


def test_study_folder_name_not_utf8_is_contained(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    gw = tmp_path / "INPUT/gateway_1"
    study_uid, files = copy_series(shared_file("series/ct-4-noise"), gw, limit=1)
    bad = os.fsencode(gw) + b"/1.2.3.\xff\xfe"
    os.makedirs(bad)
    with open(bad + b"/\xe9t\xe9.dcm", "wb") as fh:
        fh.write(files[0].read_bytes())
    proc = start_service(config)
    try:
        wait_for(
            lambda: any(
                r["state"] == "written"
                for r in ledger_rows(tmp_path / "STATE", "SELECT * FROM studies")
                if r["study_uid"] == study_uid
            ),
            60,
            "the valid study written",
        )
        time.sleep(3)  # a rescan later the service is still alive and healthy
        assert proc.poll() is None
        assert _health(config)[0] == 0
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    recorded = ledger_rows(tmp_path / "STATE", "SELECT study_uid, state FROM studies")
    assert {r["study_uid"] for r in recorded} >= {study_uid}
    assert all("\udcff" not in r["study_uid"] for r in recorded)


def test_study_file_name_not_utf8_does_not_block_its_study(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    gw = tmp_path / "INPUT/gateway_1"
    _uid, files = copy_series(shared_file("series/ct-4-noise"), gw, limit=2)
    odd = os.fsencode(files[1].parent) + b"/copy-\xff.dcm"
    shutil.copyfile(files[1], odd)
    proc = start_service(config)
    try:
        wait_for(lambda: _study_state(tmp_path / "STATE")[0] == "written", 60, "written")
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    instances = ledger_rows(tmp_path / "STATE", "SELECT path, state, reason FROM instances")
    assert len(instances) == 3
    assert sum(1 for r in instances if r["state"] == "ok") == 2
    (odd_row,) = [r for r in instances if r["state"] != "ok"]
    assert odd_row["state"] == "rejected"
    assert odd_row["reason"] == "file name is not valid UTF-8: copy-\\xff.dcm"
    assert odd_row["path"].endswith("copy-\\xff.dcm")
