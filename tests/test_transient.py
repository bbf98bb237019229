"""Transient conditions wait and are retried; they never end a study: a locked image.db, a
mount that goes away and comes back (also in the middle of a run)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import load_config
from service.engine import Engine
from service.models import build_models
from service.values import StudyState
from tests.conftest import shared_file
from tests.helpers import copy_series, ledger_rows, start_service, stop_service, wait_for
from tests.helpers import write_config as write_service_config
from tests.test_engine import make_engine, scan


def test_locked_image_db_is_waited_for_not_read_as_no_expectation(tmp_path: Path) -> None:
    """image.db lists 3 instances, 2 are on disk, the gateway app holds its lock: the study
    waits (not run with 2 of 3); after the lock the third file arrives: one run of 3."""
    gw = tmp_path / "INPUT/gateway_1"
    shutil.copytree(shared_file("gateway-sample/INPUT/gateway_1"), gw)
    (study,) = [p for p in gw.iterdir() if p.is_dir()]
    third = sorted(study.iterdir())[-1]
    aside = tmp_path / "aside"
    shutil.move(third, aside)
    locker = sqlite3.connect(gw / "image.db", timeout=0, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # what the gateway app does while it writes
    config = load_config(write_service_config(tmp_path, stable=0.2, max_wait=60), environ={})
    engine = Engine(config, build_models(config))
    try:
        scan(engine)
        end = time.monotonic() + 6  # several quiet periods and image.db busy timeouts
        while time.monotonic() < end:
            engine.tick()
            time.sleep(0.1)
        while_locked = engine.ledger.study_state("1", study.name)
        runs_while_locked = len(engine.ledger.runs())
        locker.execute("ROLLBACK")
        locker.close()
        end = time.monotonic() + 3
        while time.monotonic() < end:
            engine.tick()
            time.sleep(0.1)
        unlocked = engine.ledger.study_state("1", study.name)
        shutil.move(aside, third)
        engine.touch("1", study.name)
        assert engine.drain(60)
        (run,) = engine.ledger.runs()
        outputs = engine.ledger.outputs(run.run_id)
    finally:
        engine.close()
    assert runs_while_locked == 0
    assert while_locked is not None and while_locked[0] == StudyState.WAITING
    assert "locked" in while_locked[1]
    assert unlocked is not None and unlocked[0] == StudyState.WAITING
    assert "1 instance(s) not on disk" in unlocked[1]
    assert len(outputs) == 3


@pytest.fixture
def bind_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """INPUT/gateway_1 as a bind mount of ``remote``: unmounting it is a mount going away."""
    remote = tmp_path / "remote"
    remote.mkdir()
    target = tmp_path / "INPUT/gateway_1"
    target.mkdir(parents=True)
    proc = subprocess.run(
        ["mount", "--bind", str(remote), str(target)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip("cannot bind-mount (needs root or CAP_SYS_ADMIN): " + proc.stderr.strip())
    try:
        yield remote, target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _state(state_dir: Path, study_uid: str) -> tuple[str, str]:
    rows = ledger_rows(
        state_dir, "SELECT state, reason FROM studies WHERE study_uid=?", (study_uid,)
    )
    return (rows[0]["state"], rows[0]["reason"]) if rows else ("", "")


def test_mount_away_during_a_run_waits_and_resumes_the_same_run(
    tmp_path: Path, bind_mount: tuple[Path, Path]
) -> None:
    remote, target = bind_mount
    study_uid, _files = copy_series(shared_file("series/ct-4-noise"), remote, limit=2)
    config = write_service_config(tmp_path, stable=0.3)
    state = tmp_path / "STATE"
    # the run pauses 3 s after it is recorded, before it reads its files
    service = start_service(config, env={"GATEWAY_FAILPOINTS": "after-commit:running=sleep:3"})
    try:
        wait_for(lambda: _state(state, study_uid)[0] == "running", 60, "the run")
        subprocess.run(["umount", "-l", str(target)], check=True)  # the mount drops
        wait_for(lambda: _state(state, study_uid)[0] == "waiting", 30, "waiting")
        waiting = _state(state, study_uid)
        runs_while_away = ledger_rows(state, "SELECT state FROM runs")
        time.sleep(3)  # away for a while: still waiting, never failed
        still = _state(state, study_uid)
        subprocess.run(["mount", "--bind", str(remote), str(target)], check=True)
        wait_for(lambda: _state(state, study_uid)[0] == "written", 90, "written after the mount")
    finally:
        code, log = stop_service(service)
    assert code == 0, log
    assert "retry" in waiting[1], waiting
    assert [r["state"] for r in runs_while_away] == ["running"]
    assert still[0] == "waiting"
    runs = ledger_rows(state, "SELECT run_id, state FROM runs")
    assert [r["state"] for r in runs] == ["written"]  # the same run, resumed
    assert len(ledger_rows(state, "SELECT * FROM outputs")) == 2


def test_mount_away_before_a_study_is_stable_then_back(
    tmp_path: Path, bind_mount: tuple[Path, Path]
) -> None:
    remote, target = bind_mount
    study_uid, _files = copy_series(shared_file("series/ct-4-noise"), remote, limit=2)
    engine = make_engine(tmp_path, stable=1.0)
    try:
        scan(engine)
        engine.tick()
        subprocess.run(["umount", "-l", str(target)], check=True)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            engine.tick()
            time.sleep(0.1)
        while_away = engine.ledger.study_state("1", study_uid)
        subprocess.run(["mount", "--bind", str(remote), str(target)], check=True)
        scan(engine)  # the rescan after the mount is back
        assert engine.drain(60)
        final = engine.ledger.study_state("1", study_uid)
        runs = engine.ledger.runs()
    finally:
        engine.close()
    assert while_away is not None and while_away[0] not in (StudyState.FAILED, StudyState.SKIPPED)
    assert final is not None and final[0] == StudyState.WRITTEN
    assert len(runs) == 1


def test_send_waits_while_output_is_unreachable(tmp_path: Path) -> None:
    """OUTPUT away when the send would open: the send is deferred, not attempted; it goes
    once OUTPUT is back (one association)."""
    from tests.test_faults import CountingScp

    scp = CountingScp()
    try:
        pacs = f'[pacs]\nhost = "127.0.0.1"\nport = {scp.port}\nae_title = "{scp.ae_title}"\n'
        config = write_service_config(tmp_path, pacs, stable=0.3)
        study_uid, _ = copy_series(
            shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_1", limit=2
        )
        state, output = tmp_path / "STATE", tmp_path / "OUTPUT"
        # the send is queued with the run's 'written'; the service pauses there 3 s
        service = start_service(config, env={"GATEWAY_FAILPOINTS": "after-commit:written=sleep:3"})
        try:
            wait_for(lambda: _state(state, study_uid)[0] == "written", 60, "written")
            output.rename(tmp_path / "OUTPUT-away")  # the OUTPUT mount is gone
            time.sleep(8)  # the pause ends; the send must wait
            while_away = _state(state, study_uid)
            associations_while_away = scp.associations
            (tmp_path / "OUTPUT-away").rename(output)
            wait_for(lambda: _state(state, study_uid)[0] == "sent", 60, "sent")
        finally:
            code, log = stop_service(service)
    finally:
        scp.shutdown()
    assert code == 0, log
    assert while_away[0] == "written" and associations_while_away == 0
    assert "send deferred" in log and "not reachable" in log
    assert scp.associations == 1 and len(scp.stored) == 2
