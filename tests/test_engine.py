"""Engine: completeness rule, exactly-once runs, image.db fallback, hostile input (in-process)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from service import requests
from service.config import load_config
from service.engine import Engine
from service.ledger import Ledger, RunState, StudyState
from service.models import build_models
from service.watcher import StudyWatcher
from tests.conftest import free_port, shared_file
from tests.helpers import copy_series, run_cli, temp_files, tree_digest, write_config
from tests.postgres import Postgres


@pytest.fixture
def sample_input(tmp_path: Path) -> Path:
    """The real gateway-sample drop layout (two gateways, same study UID, 3 CT each)."""
    src = shared_file("gateway-sample/INPUT")
    shutil.copytree(src, tmp_path / "INPUT")
    return tmp_path / "INPUT"


def make_engine(tmp_path: Path, extra: str = "", stable: float = 0.3) -> Engine:
    config = load_config(write_config(tmp_path, extra, stable), environ={})
    engine = Engine(config, build_models(config))
    engine.recover()
    return engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(tmp_path)
    yield eng
    eng.close()


def scan(engine: Engine) -> None:
    engine.discover()
    StudyWatcher(engine.config.input_dir, engine.touch, mode="polling").scan()


def runs(engine: Engine) -> list[tuple[str, str, str]]:
    return [(r.gateway_id, r.study_uid, str(r.state)) for r in engine.ledger.runs()]


def test_gateway_sample_one_run_per_study_in_its_own_gateway(
    engine: Engine, sample_input: Path
) -> None:
    before = tree_digest(sample_input)
    scan(engine)
    assert engine.drain(60)
    study_uid = next(p.name for p in (sample_input / "gateway_1").iterdir() if p.is_dir())
    assert sorted(runs(engine)) == [("1", study_uid, "written"), ("2", study_uid, "written")]
    for gid in ("1", "2"):
        outputs = sorted((engine.config.output_dir / f"gateway_{gid}" / study_uid).glob("*.dcm"))
        assert len(outputs) == 3
        run = engine.ledger.runs(gid)[0]
        recorded = {Path(o["path"]) for o in engine.ledger.outputs(run.run_id)}
        assert recorded == set(outputs)
        for out in outputs:
            ds = dcmread(out)
            assert ds.StudyInstanceUID == study_uid
            assert ds.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.999.")
    # the two gateways share a StudyInstanceUID but not outputs
    uids = [
        {o["sop_instance_uid"] for o in engine.ledger.outputs(r.run_id)}
        for r in engine.ledger.runs()
    ]
    assert not uids[0] & uids[1]
    assert engine.ledger.study_state("1", study_uid) == (
        StudyState.WRITTEN,
        f"run {engine.ledger.runs('1')[0].run_id}: 3 object(s) written; no destination configured",
    )
    assert tree_digest(sample_input) == before  # inputs untouched


def test_second_event_and_identical_redrop_do_nothing_new_files_run_again(
    engine: Engine, tmp_path: Path
) -> None:
    gw = tmp_path / "INPUT" / "gateway_1"
    _, files = copy_series(shared_file("series/ct-4-noise"), gw, limit=3)
    scan(engine)
    assert engine.drain(60)
    assert len(engine.ledger.runs()) == 1
    scan(engine)  # a second event for the same files
    shutil.copyfile(files[0], files[0].with_name("same-bytes-again"))  # re-dropped identical
    scan(engine)
    assert engine.drain(60)
    assert len(engine.ledger.runs()) == 1
    copy_series(shared_file("series/ct-4-noise"), gw)  # the 4th slice arrives late
    scan(engine)
    assert engine.drain(60)
    first, second = engine.ledger.runs()
    assert second.inputs_digest != first.inputs_digest
    series = {
        r.run_id: {o["series_uid"] for o in engine.ledger.outputs(r.run_id)}
        for r in (first, second)
    }
    assert not series[first.run_id] & series[second.run_id]  # a new output series


def test_restart_does_not_run_again_and_reprocess_does(tmp_path: Path) -> None:
    copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT" / "gateway_1", limit=2)
    engine = make_engine(tmp_path)
    scan(engine)
    assert engine.drain(60)
    engine.close()
    engine = make_engine(tmp_path)  # a restart
    scan(engine)
    assert engine.drain(60)
    assert len(engine.ledger.runs()) == 1
    study_uid = engine.ledger.runs()[0].study_uid
    requests.submit(engine.config.state_dir, "reprocess", "1", study_uid)
    assert engine.drain(60)
    assert [r.generation for r in engine.ledger.runs()] == [0, 1]
    engine.close()


def test_interrupted_run_is_finished_with_the_same_uids(tmp_path: Path) -> None:
    copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT" / "gateway_1", limit=2)
    engine = make_engine(tmp_path)
    scan(engine)
    assert engine.drain(60)
    run = engine.ledger.runs()[0]
    written = {o["sop_instance_uid"] for o in engine.ledger.outputs(run.run_id)}
    # simulate a crash mid-run: the run is still 'running', a temp file is left behind
    db = sqlite3.connect(engine.config.ledger_path)  # the state a SIGKILL mid-run leaves
    with db:
        db.execute("UPDATE runs SET state='running' WHERE run_id=?", (run.run_id,))
        db.execute("UPDATE studies SET state='running'")
        db.execute("DELETE FROM finished_listings")
    db.close()
    leftover = Path(engine.ledger.outputs(run.run_id)[0]["path"]).with_name(".tmp-crash.part")
    leftover.write_bytes(b"half")
    engine.close()
    engine = make_engine(tmp_path)
    assert temp_files(engine.config.output_dir) == []
    scan(engine)
    assert engine.drain(60)
    rows = engine.ledger.runs()
    assert [(r.run_id, r.state) for r in rows] == [(run.run_id, RunState.WRITTEN)]
    assert {o["sop_instance_uid"] for o in engine.ledger.outputs(run.run_id)} == written
    engine.close()


def test_imagedb_locked_exclusively_falls_back_to_file_tags(
    engine: Engine, sample_input: Path
) -> None:
    holder = sqlite3.connect(sample_input / "gateway_1" / "image.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        scan(engine)
        assert engine.drain(60)
    finally:
        holder.rollback()
        holder.close()
    assert {r[2] for r in runs(engine)} == {"written"}
    assert len(runs(engine)) == 2


def test_imagedb_missing_instance_waits_then_runs_with_what_is_there(
    engine: Engine, sample_input: Path
) -> None:
    gw = sample_input / "gateway_1"
    study = next(p for p in gw.iterdir() if p.is_dir())
    sorted(study.iterdir())[0].unlink()  # image.db still lists it
    shutil.rmtree(sample_input / "gateway_2")
    scan(engine)
    engine.tick()
    engine.tick()
    time.sleep(0.5)
    engine.tick()
    assert engine.ledger.study_state("1", study.name)[0] == StudyState.WAITING  # type: ignore[index]
    assert engine.drain(60)  # max_wait_seconds = 3 in the test config
    (run,) = engine.ledger.runs()
    assert run.state == RunState.WRITTEN
    events = engine.ledger.query("SELECT message FROM events WHERE gateway_id='1'")
    assert any("never arrived" in e["message"] for e in events)


def test_junk_truncated_and_empty_files_are_recorded_and_the_rest_runs(
    engine: Engine, tmp_path: Path
) -> None:
    gw = tmp_path / "INPUT" / "gateway_1"
    study_uid, files = copy_series(shared_file("series/ct-4-noise"), gw, limit=3)
    (gw / study_uid / "junk").write_bytes(b"this is not DICOM" * 100)
    (gw / study_uid / "empty").write_bytes(b"")
    data = files[0].read_bytes()
    truncated = gw / study_uid / "truncated"
    truncated.write_bytes(data[: len(data) // 2])
    before = tree_digest(tmp_path / "INPUT")
    scan(engine)
    assert engine.drain(60)
    (run,) = engine.ledger.runs()
    assert run.state == RunState.WRITTEN
    rejected = {
        Path(r["path"]).name: r["reason"]
        for r in engine.ledger.query("SELECT * FROM instances WHERE state='rejected'")
    }
    assert set(rejected) == {"junk", "empty", "truncated"}
    assert all(rejected.values())
    assert tree_digest(tmp_path / "INPUT") == before


def test_a_study_of_two_patients_is_failed_with_the_reason_and_nothing_runs(
    engine: Engine, tmp_path: Path
) -> None:
    """Two PatientIDs under one StudyInstanceUID: refused as a whole (no run, no output,
    no send), an ERROR event, the reason shown by ``study``; no identifier recorded."""
    gw = tmp_path / "INPUT" / "gateway_1"
    study_uid, files = copy_series(shared_file("series/ct-4-noise"), gw, limit=2)
    other = dcmread(files[1])
    other.PatientID, other.PatientName = "OTHER-4711", "Other^Patient"
    other.save_as(files[1])
    scan(engine)
    assert engine.drain(60)
    reason = "instances of 2 different patients (PatientID differ) in one study: refused"
    assert engine.ledger.study_state("1", study_uid) == (StudyState.FAILED, reason)
    assert engine.ledger.runs() == []
    assert not (tmp_path / "OUTPUT").exists() or not any((tmp_path / "OUTPUT").rglob("*.dcm"))
    events = engine.ledger.query(
        "SELECT level, message FROM events WHERE study_uid = ?", (study_uid,)
    )
    assert ("ERROR", reason) in [(e["level"], e["message"]) for e in events]
    engine.close()
    shown = run_cli("--config", str(tmp_path / "gateway.toml"), "study", "1", study_uid)
    assert shown.returncode == 0 and reason in shown.stdout, shown.stdout + shown.stderr
    dump = "\n".join(sqlite3.connect(tmp_path / "STATE" / "ledger.sqlite3").iterdump())
    assert "OTHER-4711" not in dump and "dicom2nifti" not in dump


def test_hostile_names_and_symlinks_never_leave_the_folders(engine: Engine, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret_uid, _ = copy_series(shared_file("series/ct-4-noise"), outside, limit=1)
    gw = tmp_path / "INPUT" / "gateway_1"
    gw.mkdir(parents=True)
    os.symlink(outside / secret_uid, gw / secret_uid)  # a study folder pointing outside
    study_uid, _ = copy_series(shared_file("series/mr-phantom-63"), gw, limit=1)
    os.symlink(next((outside / secret_uid).iterdir()), gw / study_uid / "escape")
    (gw / "bad\x01name").mkdir()
    scan(engine)
    engine.touch("1", "..")
    engine.touch("1", "../../outside")
    assert engine.drain(60)
    (run,) = engine.ledger.runs()
    assert run.study_uid == study_uid and run.state == RunState.WRITTEN
    paths = [Path(r["path"]) for r in engine.ledger.query("SELECT path FROM instances")]
    assert paths and all(str(p).startswith(str(gw / study_uid)) for p in paths)
    assert "escape" not in {p.name for p in paths}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    allowed = (tmp_path / "INPUT", tmp_path / "OUTPUT", tmp_path / "STATE", outside)
    assert all(
        any(p.is_relative_to(a) for a in allowed) or p.name == "gateway.toml" for p in written
    )
    assert not (tmp_path / "OUTPUT" / "gateway_1" / secret_uid).exists()


@pytest.fixture
def pacs_pair() -> Iterator[tuple[int, int, threading.Event]]:
    """Two real pynetdicom SCPs: one holds every C-STORE until released, one stores at once."""
    release = threading.Event()

    def hold(_event: evt.Event) -> int:
        release.wait(30)
        return 0x0000

    servers = []
    ports = []
    for title, handler in (("SLOWPACS", hold), ("FASTPACS", lambda _event: 0x0000)):
        ae = AE(ae_title=title)
        ae.supported_contexts = AllStoragePresentationContexts
        ports.append(free_port())
        server = ae.start_server(
            ("127.0.0.1", ports[-1]), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)]
        )
        assert server is not None
        servers.append(server)
    yield ports[0], ports[1], release
    release.set()
    for server in servers:
        server.shutdown()


def test_a_pacs_that_holds_a_send_holds_up_no_other_gateway(
    tmp_path: Path, pacs_pair: tuple[int, int, threading.Event]
) -> None:
    slow, fast, release = pacs_pair
    held, _ = copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_1", 1)
    other, _ = copy_series(shared_file("series/mr-phantom-63"), tmp_path / "INPUT/gateway_2", 1)
    engine = make_engine(
        tmp_path,
        f"""
[gateways.1]
pacs = {{ host = "127.0.0.1", port = {slow}, ae_title = "SLOWPACS", timeout_seconds = 20 }}
[gateways.2]
pacs = {{ host = "127.0.0.1", port = {fast}, ae_title = "FASTPACS" }}
""",
    )
    try:
        scan(engine)
        deadline = time.monotonic() + 60
        while (engine.ledger.study_state("2", other) or ("",))[0] != StudyState.SENT:
            assert time.monotonic() < deadline, engine.ledger.study_state("2", other)
            engine.tick()
            engine.wait(0.1)
        # gateway_1's run went first (round-robin order) and its PACS still holds the send
        assert engine.ledger.study_state("1", held) == (
            StudyState.SENDING,
            f"SLOWPACS@127.0.0.1:{slow}",
        )
        release.set()
        assert engine.drain(30)
        assert engine.ledger.study_state("1", held)[0] == StudyState.SENT  # type: ignore[index]
    finally:
        engine.close()


def test_intake_only_while_holding_the_gateway_lease_on_postgresql(
    tmp_path: Path, postgres: Postgres
) -> None:
    """With a PostgreSQL ledger the engine takes ``intake:<gateway_id>`` at discovery; while
    another node holds it, touches of that gateway are dropped and nothing runs here; once
    the lease is free the next renewal takes it and asks for a rescan of the gateway."""
    url = postgres.database()
    (tmp_path / "INPUT/gateway_1").mkdir(parents=True)
    config = load_config(
        write_config(tmp_path, ledger=url, node_name="here", intake_lease_seconds=30),
        environ={},
    )
    other = Ledger(url, "there")
    engine = Engine(config, build_models(config))
    taken: list[list[str]] = []
    engine.on_intake_taken = taken.append
    try:
        assert other.take_lease("intake:1", "there", 30)
        assert engine.discover() == ["1"]
        assert not engine.holds_intake("1") and taken == []
        engine.touch("1", "1.2.3")
        assert engine.pending_count == 0  # another node's gateway: not ours to look at
        assert other.release_lease("intake:1", "there")
        engine.discover()  # a renewal: the lease is free now
        assert engine.holds_intake("1") and taken == [["1"]]
        assert {(x["name"], x["node"]) for x in other.leases() if x["live"]} == {
            ("intake:1", "here")
        }
        engine.touch("1", "1.2.3")
        assert engine.pending_count == 1
        assert not other.take_lease("intake:1", "there", 30)  # held and renewed by "here"
    finally:
        engine.close()
    assert other.leases() == []  # a clean close gives the lease up
    other.close()


def test_intake_needs_no_lease_on_sqlite(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "INPUT/gateway_1").mkdir(parents=True, exist_ok=True)
    engine.discover()
    assert engine.holds_intake("1") and engine.ledger.leases() == []
    engine.touch("1", "1.2.3")
    assert engine.pending_count == 1
