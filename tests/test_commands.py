"""Honest commands: status/studies/study read the ledger read-only and say what is there;
resend/reprocess are requests carried out by the running service, answered or refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from service import requests
from service.cli import main
from service.ledger import Ledger, NewRun, OutputRecord, RunState, StudyState, Transition
from tests.conftest import free_port, shared_file
from tests.helpers import (
    ROOT,
    copy_series,
    run_cli,
    start_service,
    stop_service,
    wait_for,
    wait_service,
    write_config,
)

PATIENT_NAME = "Doe^Jane"


class Peer:
    """A real pynetdicom storage SCP answering every C-STORE with ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.associations = 0
        self.port = free_port()
        ae = AE(ae_title="TESTPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, lambda _e: self.status),
                (evt.EVT_CONN_OPEN, self._opened),
            ],
        )
        assert server is not None
        self._server = server

    def _opened(self, _event: evt.Event) -> None:
        self.associations += 1

    def config(self) -> str:
        return f'[pacs]\nhost = "127.0.0.1"\nport = {self.port}\nae_title = "TESTPACS"\n'

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def peer() -> Iterator[Peer]:
    scp = Peer(0xA700)  # out of resources: every instance fails
    yield scp
    scp.close()


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(config), *args, timeout=timeout)


# -- before anything ran -------------------------------------------------------------------


def test_status_json_before_any_run_is_json_and_creates_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = cli(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["service"] == "not run yet" and report["gateways"] == {}
    assert report["healthy"] is False and report["health"].startswith("unhealthy")
    plain = cli(config, "status")
    assert plain.returncode == 0 and "the service has not run yet" in plain.stdout
    listed = cli(config, "studies", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    unknown = cli(config, "study", "1", "1.2.3")
    assert unknown.returncode == 1 and "unknown gateway 1" in unknown.stderr
    bad_state = cli(config, "studies", "--state", "finished")
    assert bad_state.returncode == 2
    assert "send_failed" in bad_state.stderr and "waiting_model" in bad_state.stderr
    assert not (tmp_path / "STATE").exists()  # a read never creates STATE


# -- the history of a study the real service processed ------------------------------------


@pytest.fixture
def processed(tmp_path: Path, peer: Peer) -> tuple[Path, str]:
    """A CT study (2 files + one junk file) processed by ``serve --once``; its send to a
    peer answering 0xA700 failed."""
    config = write_config(tmp_path, peer.config(), stable=0.2, node_name="edge-7")
    gw = tmp_path / "INPUT/gateway_3"
    study_uid, _ = copy_series(shared_file("series/ct-4-noise"), gw, limit=2)
    (gw / study_uid / "notes.txt").write_bytes(b"not a DICOM file\n" * 8)
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "60"))
    assert code == 0, log
    assert peer.associations == 1
    return config, study_uid


def test_studies_and_study_history_of_a_real_run(
    processed: tuple[Path, str], tmp_path: Path, peer: Peer
) -> None:
    config, study_uid = processed
    ledger_bytes = (tmp_path / "STATE/ledger.sqlite3").read_bytes()
    listed = cli(config, "studies", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert {k: row[k] for k in ("gateway_id", "study_uid", "state")} == {
        "gateway_id": "3",
        "study_uid": study_uid,
        "state": "send_failed",
    }
    assert "failure statuses: 0xA700 Refused: Out of Resources (2)" in row["reason"]
    assert row["updated_at"].endswith("Z") and "T" in row["updated_at"]
    assert "node" in row
    assert json.loads(cli(config, "studies", "--json", "--state", "sent").stdout) == []
    assert json.loads(cli(config, "studies", "--json", "--gateway", "3").stdout) == [row]
    assert cli(config, "studies", "--gateway", "9").returncode == 1
    text = cli(config, "studies")
    assert text.returncode == 0 and f"3 {study_uid} send_failed" in text.stdout

    history = cli(config, "study", "3", study_uid, "--json")
    assert history.returncode == 0, history.stderr
    h = json.loads(history.stdout)
    assert h["state"] == "send_failed"
    rejected = [f for f in h["files"] if f["state"] == "rejected"]
    assert [f["path"] for f in rejected] == ["notes.txt"]  # relative to the study folder
    assert "not a DICOM file" in rejected[0]["reason"]
    assert len([f for f in h["files"] if f["state"] == "ok"]) == 2
    (run,) = h["runs"]
    assert run["model_name"] == "annotate" and run["state"] == "send_failed"
    assert len(run["outputs"]) == 2 and all(o["sop_instance_uid"] for o in run["outputs"])
    (send,) = run["sends"]
    assert send["destination"] == f"TESTPACS@127.0.0.1:{peer.port}"
    assert send["manual"] is False and send["state"] == "failure"
    outputs = {o["sop_instance_uid"] for o in run["outputs"]}
    assert {i["sop_instance_uid"] for i in send["items"]} == outputs
    assert {(i["status"], i["status_code"]) for i in send["items"]} == {("failure", 0xA700)}
    assert {i["status_text"] for i in send["items"]} == {"0xA700 Refused: Out of Resources"}

    plain = cli(config, "study", "3", study_uid)
    assert plain.returncode == 0, plain.stderr
    assert "rejected notes.txt: not a DICOM file" in plain.stdout
    assert "failure 0xA700 Refused: Out of Resources" in plain.stdout
    assert "TESTPACS@127.0.0.1" in plain.stdout
    assert PATIENT_NAME not in plain.stdout + history.stdout
    assert cli(config, "study", "3", "1.2.3").returncode == 1
    assert cli(config, "study", "4", study_uid).returncode == 1
    # none of these reads wrote the ledger
    assert (tmp_path / "STATE/ledger.sqlite3").read_bytes() == ledger_bytes


def test_studies_show_the_node_of_the_latest_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    ledger = Ledger(tmp_path / "STATE/ledger.sqlite3")
    for digest, node in (("d1", "edge-1"), ("d2", "edge-2")):
        run = NewRun("annotate", "1.0", digest, 1, node=node)
        ledger.apply(Transition("1", "1.2.3", StudyState.RUNNING, new_run=run))
    ledger.apply(Transition("1", "1.2.3", StudyState.FAILED, "done"))
    ledger.apply(Transition("1", "1.2.4", StudyState.RECEIVING))
    ledger.close()
    assert main(["--config", str(config), "studies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["study_uid"], r["node"]) for r in rows] == [("1.2.3", "edge-2"), ("1.2.4", "")]
    assert main(["--config", str(config), "study", "1", "1.2.3", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["node"] for r in runs] == ["edge-1", "edge-2"]


# -- resend / reprocess: refused, or not carried out without a service ----------------------


def test_resend_and_reprocess_without_a_service_exit_1_and_send_nothing(
    processed: tuple[Path, str], tmp_path: Path, peer: Peer
) -> None:
    config, study_uid = processed
    peer.status = 0x0000  # the PACS would accept now: only the service may send
    ledger_bytes = (tmp_path / "STATE/ledger.sqlite3").read_bytes()
    folder = tmp_path / "STATE/requests"
    for kind in ("resend", "reprocess"):
        unknown_gw = cli(config, kind, "9", study_uid, "--wait", "1")
        assert unknown_gw.returncode == 1 and "unknown gateway 9" in unknown_gw.stderr
        unknown_study = cli(config, kind, "3", "1.2.3", "--wait", "1")
        assert unknown_study.returncode == 1 and "has no study 1.2.3" in unknown_study.stderr
        assert cli(config, kind, "3", "../x").returncode == 2
        assert not folder.exists() or list(folder.iterdir()) == []  # nothing requested
        started = time.monotonic()
        waited = cli(config, kind, "3", study_uid, "--wait", "1")
        assert waited.returncode == 1, waited.stdout + waited.stderr
        assert "no running service picked up the request within 1 s" in waited.stderr
        assert "withdrawn" in waited.stderr and time.monotonic() - started < 30
        assert list(folder.iterdir()) == []  # withdrawn
    queued = cli(config, "reprocess", "3", study_uid, "--wait", "0", "--queue")
    assert queued.returncode == 1 and "stays queued" in queued.stderr
    (left,) = list(folder.iterdir())
    assert json.loads(left.read_text())["kind"] == "reprocess"
    assert peer.associations == 1  # still only the service's own attempt
    assert (tmp_path / "STATE/ledger.sqlite3").read_bytes() == ledger_bytes


# -- the request protocol, the service's side driven from the test --------------------------


def start_cli(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def take_one(state_dir: Path, timeout: float = 30) -> requests.Request:
    """What the engine does on a tick: take the waiting requests."""
    found: list[requests.Request] = []

    def taken() -> bool:
        found.extend(requests.take_requests(state_dir))
        return bool(found)

    wait_for(taken, timeout, "a request")
    (request,) = found
    return request


@pytest.fixture
def known_study(tmp_path: Path) -> tuple[Path, str]:
    """A ledger with gateway 1's study 1.2.3 written (outputs recorded)."""
    config = write_config(tmp_path)
    ledger = Ledger(tmp_path / "STATE/ledger.sqlite3")
    ledger.add_gateway("1", tmp_path / "INPUT/gateway_1")
    run = ledger.apply(
        Transition("1", "1.2.3", StudyState.RUNNING, new_run=NewRun("annotate", "1.0", "d1", 1))
    ).run_id
    output = OutputRecord(tmp_path / "OUTPUT/a.dcm", "1.2.840.10008.5.1.4.1.1.7", "1.2.9", "1.2.8")
    ledger.apply(
        Transition(
            "1", "1.2.3", StudyState.WRITTEN, run_id=run, run=RunState.WRITTEN, outputs=[output]
        )
    )
    ledger.close()
    return config, "1.2.3"


@pytest.mark.parametrize(("ok", "state", "code"), [(True, "sent", 0), (False, "send_failed", 1)])
def test_resend_prints_the_services_answer_and_exits_by_it(
    known_study: tuple[Path, str], tmp_path: Path, ok: bool, state: str, code: int
) -> None:
    config, study_uid = known_study
    state_dir = tmp_path / "STATE"
    proc = start_cli(config, "resend", "1", study_uid, "--wait", "30")
    try:
        request = take_one(state_dir)
        assert (request.kind, request.gateway_id, request.study_uid) == ("resend", "1", study_uid)
        assert request.answerable and request.created.endswith("Z")
        # taken: the CLI can no longer withdraw it
        assert not requests.withdraw(state_dir, request)
        requests.write_result(state_dir, request, ok, state, "failure: 0xA700" if not ok else "")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, out + err
    assert f"resend of gateway 1 study {study_uid}: {state}" in out
    assert ("0xA700" in out) is (not ok)
    assert list((state_dir / "requests").iterdir()) == []  # the CLI removed the answer


def test_a_taken_request_without_answer_is_reported_as_such(
    known_study: tuple[Path, str], tmp_path: Path
) -> None:
    config, study_uid = known_study
    state_dir = tmp_path / "STATE"
    proc = start_cli(config, "reprocess", "1", study_uid, "--wait", "2")
    try:
        request = take_one(state_dir)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "took the request but gave no answer within 2 s" in err, out + err
    # a service restarted after dying here answers it as interrupted, not carried out again
    assert requests.fail_interrupted(state_dir) == 1
    result = requests.read_result(state_dir, request)
    assert result is not None and not result.ok and result.state == "interrupted"
    assert requests.take_requests(state_dir) == []


def test_take_requests_claims_once_refuses_malformed_and_reads_old_style(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "STATE"
    assert requests.take_requests(state_dir) == []  # no folder yet
    first = requests.submit(state_dir, "reprocess", "1", "1.2.3")
    withdrawn = requests.submit(state_dir, "resend", "1", "1.2.4")
    assert requests.withdraw(state_dir, withdrawn)
    folder = state_dir / "requests"
    (folder / "bad.request.json").write_text("{not json")
    (folder / "evil.request.json").write_text(
        json.dumps({"kind": "resend", "gateway_id": "1", "study_uid": "../x", "created": ""})
    )
    (folder / "2__1.2.5").write_text("reprocess\n")  # older versions' request_reprocess
    taken = requests.take_requests(state_dir)
    assert [(r.kind, r.gateway_id, r.study_uid, r.answerable) for r in taken] == [
        ("reprocess", "2", "1.2.5", False),
        ("reprocess", "1", "1.2.3", True),
    ]
    assert taken[1] == first
    assert requests.take_requests(state_dir) == []  # each request is taken once
    for name in ("bad", "evil"):
        result = requests.read_result(state_dir, requests.Request(name, "", "", "", ""))
        assert result is not None and not result.ok and result.state == "refused"
    requests.write_result(state_dir, taken[0], True, "queued", "")  # old style: no answer
    requests.write_result(state_dir, first, True, "queued", "new run queued")
    answer = requests.read_result(state_dir, first)
    assert answer is not None and answer.request_id == first.request_id
    assert (answer.ok, answer.state, answer.message) == (True, "queued", "new run queued")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{first.request_id}.result.json", "bad.result.json", "evil.result.json"]
    )
    with pytest.raises(ValueError, match="unknown request kind"):
        requests.submit(state_dir, "delete", "1", "1.2.3")


# -- with the engine carrying requests out (once service/engine.py calls take_requests) -----


def test_running_service_carries_out_reprocess_and_resend(tmp_path: Path, peer: Peer) -> None:
    config = write_config(tmp_path, peer.config(), stable=0.2)
    study_uid, _ = copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_3", 2)
    proc = start_service(config)
    try:
        wait_for(
            lambda: (
                cli(config, "studies", "--state", "send_failed", "--json").stdout.count(study_uid)
                == 1
            ),
            120,
            "the first send to fail",
        )
        peer.status = 0x0000
        resent = cli(config, "resend", "3", study_uid, "--wait", "60")
        assert resent.returncode == 0, resent.stdout + resent.stderr
        assert "sent" in resent.stdout
        again = cli(config, "reprocess", "3", study_uid, "--wait", "60")
        assert again.returncode == 0, again.stdout + again.stderr
        wait_for(
            lambda: (
                len(json.loads(cli(config, "study", "3", study_uid, "--json").stdout)["runs"]) == 2
            ),
            120,
            "the reprocess run",
        )
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    assert peer.associations >= 2


def test_a_queued_reprocess_runs_at_the_next_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, stable=0.2)
    study_uid, _ = copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_3", 2)
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "60"))
    assert code == 0, log
    queued = cli(config, "reprocess", "3", study_uid, "--wait", "0", "--queue")
    assert queued.returncode == 1 and "stays queued" in queued.stderr
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "60"))
    assert code == 0, log
    runs = json.loads(cli(config, "study", "3", study_uid, "--json").stdout)["runs"]
    assert [r["state"] for r in runs] == ["written", "written"]
