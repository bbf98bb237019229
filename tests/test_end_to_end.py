"""Whole service: CXR and annotate studies through the real process to a real Orthanc."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from service.config import load_config
from service.engine import Engine
from service.ledger import StudyState
from service.models import build_models
from service.watcher import StudyWatcher
from tests.conftest import dciodvfy, free_port, shared_file
from tests.helpers import (
    copy_series,
    ledger_rows,
    run_cli,
    start_service,
    stop_service,
    wait_service,
    write_config,
)
from tests.orthanc import Orthanc
from tests.test_cxr import write_checkpoint

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("weights"))


def pipeline_config(tmp_path: Path, weights: Path, port: int, ae_title: str = "ORTHANC") -> Path:
    """CXR and annotate rules, two worker processes, the PACS at ``port``."""
    pacs = f"""
[pacs]
host = "127.0.0.1"
port = {port}
ae_title = "{ae_title}"
timeout_seconds = 5
[models.cxr]
weights = "{weights}"
device = "cpu"
"""
    rules = '[{ model = "cxr-densenet121", modality = ["CR", "DX"] }, { model = "annotate" }]'
    return write_config(tmp_path, pacs, workers=2, rules=rules, max_wait=2)


def drop_cxr(gateway_dir: Path, *names: str) -> str:
    staging = gateway_dir.parent.parent / "staging"
    staging.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(shared_file(f"cxr/{name}"), staging / name)
    study_uid, _ = copy_series(staging, gateway_dir)
    shutil.rmtree(staging)
    return study_uid


def test_cxr_and_ct_studies_reach_orthanc_in_their_own_studies(
    tmp_path: Path, checkpoint: Path, orthanc: Orthanc
) -> None:
    config = pipeline_config(tmp_path, checkpoint, orthanc.dicom_port, orthanc.ae_title)
    cxr_uid = drop_cxr(tmp_path / "INPUT/gateway_1", "siim-cr-pa-jpeg.dcm")
    ct_uid, _ = copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_2", 2)
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "300"), 320)
    assert code == 0, log
    runs = ledger_rows(tmp_path / "STATE", "SELECT * FROM runs ORDER BY gateway_id")
    assert [(r["gateway_id"], r["model_name"], r["state"]) for r in runs] == [
        ("1", "cxr-densenet121", "sent"),
        ("2", "annotate", "sent"),
    ]
    outputs = ledger_rows(tmp_path / "STATE", "SELECT * FROM outputs")
    by_run = {r["run_id"]: [o for o in outputs if o["run_id"] == r["run_id"]] for r in runs}
    cxr_outputs = by_run[runs[0]["run_id"]]
    assert {o["sop_class_uid"] for o in cxr_outputs} & SR_CLASSES
    assert SC_CLASS in {o["sop_class_uid"] for o in cxr_outputs}
    for study_uid, rows in ((cxr_uid, cxr_outputs), (ct_uid, by_run[runs[1]["run_id"]])):
        for row in rows:
            path = Path(row["path"])
            assert path.is_relative_to(tmp_path / "OUTPUT")
            assert dciodvfy(path) == []
            ids = orthanc.lookup(row["sop_instance_uid"])
            assert len(ids) == 1, row["sop_instance_uid"]
            tags = orthanc.get(f"/instances/{ids[0]}/simplified-tags")
            assert tags["StudyInstanceUID"] == study_uid
            assert tags["SeriesInstanceUID"] == row["series_uid"]
    sends = ledger_rows(tmp_path / "STATE", "SELECT state FROM sends")
    assert [s["state"] for s in sends] == ["success", "success"]
    items = ledger_rows(tmp_path / "STATE", "SELECT DISTINCT status FROM send_items")
    assert [i["status"] for i in items] == ["success"]
    # the findings summary is in the ledger and shown by status
    status = run_cli("--config", str(config), "status")
    assert "cxr-densenet121" in status.stdout and "[" in status.stdout
    assert any(name in status.stdout for name in ("Atelectasis", "Effusion", "Cardiomegaly"))


def test_missing_weights_make_cxr_studies_wait(tmp_path: Path, checkpoint: Path) -> None:
    config = pipeline_config(tmp_path, tmp_path / "absent.pt", free_port())
    cxr_uid = drop_cxr(tmp_path / "INPUT/gateway_1", "siim-cr-pa-jpeg.dcm")
    engine = Engine(load_config(config, environ={}), build_models(load_config(config, {})))
    try:
        engine.discover()
        StudyWatcher(engine.config.input_dir, engine.touch, mode="polling").scan()
        assert not engine.drain(3)  # it waits, it does not fail
        state, reason = engine.ledger.study_state("1", cxr_uid)  # type: ignore[misc]
        assert state == StudyState.WAITING_MODEL
        assert "absent.pt" in reason and "models fetch" in reason
        assert engine.ledger.runs() == []
    finally:
        engine.close()


@pytest.fixture
def failing_peer() -> Iterator[tuple[int, list[int]]]:
    """A real pynetdicom SCP answering every C-STORE with 0xA700 (out of resources)."""
    ae = AE(ae_title="FULLPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    associations: list[int] = []
    lock = threading.Lock()

    def on_open(_event: evt.Event) -> None:
        with lock:
            associations.append(1)

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda _e: 0xA700), (evt.EVT_CONN_OPEN, on_open)],
    )
    assert server is not None
    yield port, associations
    server.shutdown()


def test_send_failure_is_recorded_not_retried_and_resend_works(
    tmp_path: Path, checkpoint: Path, failing_peer: tuple[int, list[int]], orthanc: Orthanc
) -> None:
    port, associations = failing_peer
    config = pipeline_config(tmp_path, checkpoint, port, "FULLPACS")
    gw = tmp_path / "INPUT/gateway_1"
    first, _ = copy_series(shared_file("series/ct-4-noise"), gw, 1)
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "120"), 150)
    assert code == 0, log
    assert len(associations) == 1  # exactly one attempt
    runs = ledger_rows(tmp_path / "STATE", "SELECT * FROM runs")
    assert [r["state"] for r in runs] == ["send_failed"]
    assert "0xA700" in runs[0]["reason"] or "a700" in runs[0]["reason"].lower()
    outputs = ledger_rows(tmp_path / "STATE", "SELECT path FROM outputs")
    assert outputs and all(Path(o["path"]).exists() for o in outputs)  # kept in OUTPUT
    # the service kept running and processes the next study; still no retry of the first
    copy_series(shared_file("series/mr-phantom-63"), gw, 1)
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "120"), 150)
    assert code == 0, log
    assert len(associations) == 2
    # an operator fixes the destination, restarts the service and asks it to resend
    fixed = pipeline_config(tmp_path, checkpoint, orthanc.dicom_port, orthanc.ae_title)
    service = start_service(fixed)
    try:
        result = run_cli("--config", str(fixed), "resend", "1", first, "--wait", "120")
    finally:
        code, log = stop_service(service)
    assert code == 0, log
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ledger_rows(
        tmp_path / "STATE",
        "SELECT o.sop_instance_uid FROM outputs o JOIN runs r USING (run_id) WHERE study_uid=?",
        (first,),
    ):
        assert len(orthanc.lookup(row["sop_instance_uid"])) == 1
    sends = ledger_rows(tmp_path / "STATE", "SELECT manual, state FROM sends ORDER BY send_id")
    assert [(s["manual"], s["state"]) for s in sends][-1] == (1, "success")
    assert dcmread(Path(outputs[0]["path"])).StudyInstanceUID == first
