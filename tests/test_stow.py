"""STOW-RS sending: a real Orthanc with its DICOMweb plugin and authentication on, and real
HTTP peers that answer what Orthanc would not (409 with a failure list, 202, silence)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.config import DEFAULT_UID_ROOT, PacsConfig
from service.sender import SendHandle, SendStatus
from service.sendlanes import SendLanes
from service.stow import send_files_stow
from service.uids import UidFactory
from tests.conftest import free_port
from tests.helpers import copy_series, ledger_rows, start_service, wait_service, write_config
from tests.orthanc import Orthanc, start_orthanc, stop_orthanc
from tests.peers import copy_with_new_uids

USER, PASSWORD = "gateway", "s3cret-Pa55"


@pytest.fixture(scope="module")
def orthanc_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with the DICOMweb plugin, HTTP Basic authentication required."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-web"), users={USER: PASSWORD})
    try:
        yield server
    finally:
        stop_orthanc(server)


def web(url: str, timeout: float = 10.0, **more: Any) -> PacsConfig:
    return PacsConfig(url=url, timeout_seconds=timeout, **more)


def sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_stores_every_instance_in_orthanc(orthanc_web: Orthanc, ct: Path, mr: Path) -> None:
    destination = web(orthanc_web.dicomweb_url, username=USER, password=PASSWORD)
    result = send_files_stow(destination, [ct, mr])
    assert result.status is SendStatus.SUCCESS, result.reason
    assert result.ok
    assert [i.status for i in result.items] == [SendStatus.SUCCESS] * 2
    assert [i.sop_instance_uid for i in result.items] == [sop_uid(ct), sop_uid(mr)]
    for path in (ct, mr):
        (instance,) = orthanc_web.lookup(sop_uid(path))
        assert orthanc_web.get_bytes(f"/instances/{instance}/file") == path.read_bytes()


def test_through_the_lanes(orthanc_web: Orthanc, ct: Path) -> None:
    """sendlanes dispatches a destination with ``url`` to STOW-RS."""
    destination = web(orthanc_web.dicomweb_url, username=USER, password=PASSWORD)
    with SendLanes() as lanes:
        result = lanes.submit(destination, [ct]).result(timeout=30)
    assert result.status is SendStatus.SUCCESS, result.reason
    assert orthanc_web.lookup(sop_uid(ct))


def test_wrong_password_fails_and_stores_nothing(
    orthanc_web: Orthanc, ct: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-Pa55word"
    destination = web(orthanc_web.dicomweb_url, username=USER, password=wrong)
    result = send_files_stow(destination, [ct])
    assert result.status is SendStatus.FAILURE
    assert "HTTP 401" in result.reason
    assert [(i.status, i.sop_instance_uid) for i in result.items] == [
        (SendStatus.FAILURE, sop_uid(ct))
    ]
    assert orthanc_web.lookup(sop_uid(ct)) == []
    assert wrong not in caplog.text and wrong not in result.reason


def test_refused_when_nothing_listens(ct: Path) -> None:
    result = send_files_stow(web(f"http://127.0.0.1:{free_port()}/dicom-web"), [ct])
    assert result.status is SendStatus.REFUSED
    assert [i.status for i in result.items] == [SendStatus.REFUSED]


class _Peer:
    """A real HTTP server answering every POST with ``status`` and ``answer`` (JSON)."""

    def __init__(self, status: int, answer: dict[str, Any] | None, hang: bool = False) -> None:
        peer = self
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                peer.requests.append((self.path, dict(self.headers), body))
                if hang:
                    peer.release.wait(10)
                    return
                data = json.dumps(answer or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Peer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _sop(uid: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def test_409_every_instance_failed_with_its_reason(ct: Path, mr: Path) -> None:
    answer = {
        "00081198": {"vr": "SQ", "Value": [_sop(sop_uid(ct), 0xC000), _sop(sop_uid(mr), 0x0110)]}
    }
    with _Peer(409, answer) as peer:
        result = send_files_stow(web(peer.url, token="tok-123"), [ct, mr])
    assert result.status is SendStatus.FAILURE
    assert "HTTP 409" in result.reason
    assert [(i.status, i.status_code) for i in result.items] == [
        (SendStatus.FAILURE, 0xC000),
        (SendStatus.FAILURE, 0x0110),
    ]
    ((path, headers, body),) = peer.requests
    assert path == "/web/studies"
    assert headers["Authorization"] == "Bearer tok-123"
    content_type = headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("=", 1)[1].encode()
    assert body.count(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n") == 2
    assert body.endswith(b"--" + boundary + b"--\r\n")
    assert ct.read_bytes() in body and mr.read_bytes() in body


def test_202_some_failed(ct: Path, mr: Path) -> None:
    answer = {
        "00081199": {"vr": "SQ", "Value": [_sop(sop_uid(ct))]},
        "00081198": {"vr": "SQ", "Value": [_sop(sop_uid(mr), 0xA700)]},
    }
    with _Peer(202, answer) as peer:
        result = send_files_stow(web(peer.url), [ct, mr])
    assert result.status is SendStatus.FAILURE
    assert [(i.status, i.status_code) for i in result.items] == [
        (SendStatus.SUCCESS, None),
        (SendStatus.FAILURE, 0xA700),
    ]


def test_timeout_bounds_the_whole_request(ct: Path) -> None:
    with _Peer(200, None, hang=True) as peer:
        result = send_files_stow(web(peer.url, timeout=1.0), [ct])
    assert result.status is SendStatus.TIMED_OUT
    assert "timeout_seconds=1" in result.reason
    assert [i.status for i in result.items] == [SendStatus.TIMED_OUT]


def test_unreadable_file_is_an_error_not_sent(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with socket.socket() as unused:  # nothing is contacted: no readable file
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = send_files_stow(web(f"http://127.0.0.1:{port}/x"), [junk])
    assert result.status is SendStatus.ERROR


@pytest.mark.parametrize("good", [True, False], ids=["right-password", "wrong-password"])
def test_the_service_sends_with_stow_and_records_the_outcome(
    tmp_path: Path, orthanc_web: Orthanc, good: bool
) -> None:
    """The service as a process, its destination DICOMweb from the environment: the send
    and each instance's outcome are in the ledger, the password in no log."""
    password = PASSWORD if good else "wrong-Pa55-xyz"
    config = write_config(tmp_path, "[pacs]\ntimeout_seconds = 10\n")
    env = {
        "GATEWAY_PACS_URL": orthanc_web.dicomweb_url,
        "GATEWAY_PACS_USERNAME": USER,
        "GATEWAY_PACS_PASSWORD": password,
    }
    uids = UidFactory(DEFAULT_UID_ROOT, "test-stow-e2e", uuid.uuid4().hex)
    source = tmp_path / "source"
    source.mkdir()
    copy_with_new_uids("CT_small.dcm", source, uids, "ct")
    study_uid, _ = copy_series(source, tmp_path / "INPUT/gateway_1")
    proc = start_service(config, "--once", "--once-timeout", "120", env=env)
    code, log = wait_service(proc, 150)
    assert code == 0, log
    assert password not in log
    state = tmp_path / "STATE"
    (run,) = ledger_rows(state, "SELECT * FROM runs WHERE study_uid=?", (study_uid,))
    (send,) = ledger_rows(state, "SELECT * FROM sends")
    assert send["destination"] == orthanc_web.dicomweb_url
    items = ledger_rows(state, "SELECT sop_instance_uid, status FROM send_items")
    outputs = ledger_rows(state, "SELECT sop_instance_uid FROM outputs")
    assert outputs and {i["sop_instance_uid"] for i in items} == {
        o["sop_instance_uid"] for o in outputs
    }
    if good:
        assert run["state"] == "sent", run["reason"]
        assert {i["status"] for i in items} == {"success"}
        for output in outputs:
            assert len(orthanc_web.lookup(output["sop_instance_uid"])) == 1
    else:
        assert run["state"] == "send_failed"
        assert "HTTP 401" in run["reason"] and "HTTP 401" in send["reason"]
        assert {i["status"] for i in items} == {"failure"}
        for output in outputs:
            assert orthanc_web.lookup(output["sop_instance_uid"]) == []


def test_cancel_interrupts_an_open_request(ct: Path) -> None:
    with _Peer(200, None, hang=True) as peer:
        handle = SendHandle()
        timer = threading.Timer(0.5, handle.cancel)
        timer.start()
        result = send_files_stow(web(peer.url, timeout=30.0), [ct], handle)
        timer.join()
    assert result.status is SendStatus.INTERRUPTED
    assert [i.status for i in result.items] == [SendStatus.INTERRUPTED]
    # a handle cancelled before the send: nothing is contacted
    result = send_files_stow(web(f"http://127.0.0.1:{free_port()}/x"), [ct], handle)
    assert result.status is SendStatus.INTERRUPTED
