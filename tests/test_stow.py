"""STOW-RS sending: a real Orthanc with its DICOMweb plugin and authentication on (over HTTP
and over HTTPS), and real HTTP peers that answer what Orthanc would not (409 with a failure
list, 202, silence)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.config import DEFAULT_UID_ROOT, PacsConfig
from service.sender import SendHandle, SendStatus, status_text
from service.sendlanes import SendLanes
from service.stow import send_files_stow
from service.uids import UidFactory
from tests.conftest import free_port
from tests.helpers import (
    copy_series,
    ledger_rows,
    run_cli,
    start_service,
    wait_service,
    write_config,
)
from tests.orthanc import Orthanc, start_orthanc, stop_orthanc
from tests.peers import copy_with_new_uids
from tests.test_sender_tls import make_pki
from tests.tlsfront import TlsFront

USER, PASSWORD = "gateway", "s3cret-Pa55"


@pytest.fixture(scope="module")
def orthanc_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with the DICOMweb plugin, HTTP Basic authentication required."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-web"), users={USER: PASSWORD})
    try:
        yield server
    finally:
        stop_orthanc(server)


@dataclass
class Https:
    """Orthanc with the DICOMweb plugin and authentication on, behind HTTPS (``TlsFront``:
    see tests/tlsfront.py for why not Orthanc's own ``SslEnabled``), its certificate for
    127.0.0.1 signed by ``ca``; ``other_ca`` did not sign it."""

    orthanc: Orthanc
    front: TlsFront
    ca: Path
    other_ca: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.front.port}/dicom-web"


@pytest.fixture(scope="module")
def orthanc_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Https]:
    folder = tmp_path_factory.mktemp("orthanc-https")
    pki = make_pki(folder / "pki", "site")  # throwaway CAs and certificates (openssl)
    other = make_pki(folder / "other", "other")
    server = start_orthanc(folder, users={USER: PASSWORD})
    try:
        with TlsFront(pki["server.pem"], pki["server.key"], server.http_port) as front:
            yield Https(server, front, pki["ca.pem"], other["ca.pem"])
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
    """A real HTTP server answering every POST with ``status`` and ``answer`` (JSON), or
    with what ``answer_for(body, content_type)`` makes of the request."""

    def __init__(
        self,
        status: int,
        answer: dict[str, Any] | None,
        hang: bool = False,
        answer_for: Callable[[bytes, str], dict[str, Any]] | None = None,
    ) -> None:
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
                made = answer_for(body, self.headers["Content-Type"]) if answer_for else None
                data = json.dumps(made or answer or {}).encode()
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


def _sop(uid: str, reason: int | None = None, warning: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def test_409_every_instance_failed_with_its_reason(ct: Path, mr: Path) -> None:
    answer = {
        "00081198": {"vr": "SQ", "Value": [_sop(sop_uid(ct), 0xC000), _sop(sop_uid(mr), 0x0110)]}
    }
    with _Peer(409, answer) as peer:
        result = send_files_stow(web(peer.url, token="tok-123"), [ct, mr])
    assert result.status is SendStatus.FAILURE
    assert "HTTP 409" in result.reason
    # each Failure Reason with its meaning from the standard's table (pynetdicom's)
    assert "failure statuses: 0x0110 Processing Failure (1), 0xC000 Cannot Understand (1)" in (
        result.reason
    )
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
    assert "failure statuses: 0xA700 Refused: Out of Resources (1)" in result.reason


def test_a_warning_reason_is_a_warning_with_its_code(ct: Path, mr: Path) -> None:
    """Stored with a Warning Reason (0008,1196): ``warning``, the reason recorded as the code
    and named in the reason; an unknown code is shown as its hex."""
    answer = {
        "00081199": {
            "vr": "SQ",
            "Value": [_sop(sop_uid(ct), warning=0xB000), _sop(sop_uid(mr), warning=0xB0F1)],
        }
    }
    with _Peer(202, answer) as peer:
        result = send_files_stow(web(peer.url), [ct, mr])
    assert result.status is SendStatus.WARNING and result.ok
    assert [(i.status, i.status_code) for i in result.items] == [
        (SendStatus.WARNING, 0xB000),
        (SendStatus.WARNING, 0xB0F1),
    ]
    assert "warning statuses: 0xB000 Coercion of Data Elements (1), 0xB0F1 (1)" in result.reason


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
    env = {
        "GATEWAY_PACS_URL": orthanc_web.dicomweb_url,
        "GATEWAY_PACS_USERNAME": USER,
        "GATEWAY_PACS_PASSWORD": password,
    }
    study_uid, log, _ = _service_once(tmp_path, "[pacs]\ntimeout_seconds = 10\n", env)
    assert password not in log
    # credentials over plain http://: a warning at start naming the destination and url
    (warning,) = [line for line in log.splitlines() if "would travel unencrypted" in line]
    assert "WARNING" in warning and "[pacs]" in warning
    assert orthanc_web.dicomweb_url in warning and "http://" in warning
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


def test_https_with_tls_ca_stores_every_instance_byte_for_byte(
    orthanc_https: Https, ct: Path, mr: Path
) -> None:
    https = orthanc_https
    destination = web(https.url, username=USER, password=PASSWORD, tls_ca=str(https.ca))
    result = send_files_stow(destination, [ct, mr])
    assert result.status is SendStatus.SUCCESS, result.reason
    for path in (ct, mr):
        (instance,) = https.orthanc.lookup(sop_uid(path))
        assert https.orthanc.get_bytes(f"/instances/{instance}/file") == path.read_bytes()


def test_https_with_a_ca_that_did_not_sign_the_server_sends_nothing(
    orthanc_https: Https, ct: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One connection, its handshake refused by us (the certificate does not verify): the
    request, credentials included, never leaves; no second attempt."""
    https = orthanc_https
    before = (https.front.connections, https.front.failed_handshakes)
    destination = web(https.url, username=USER, password=PASSWORD, tls_ca=str(https.other_ca))
    result = send_files_stow(destination, [ct])
    assert result.status is SendStatus.REFUSED
    assert "TLS handshake failed" in result.reason
    assert "certificate" in result.reason and "tls_ca" in result.reason
    assert [i.status for i in result.items] == [SendStatus.REFUSED]
    assert https.orthanc.lookup(sop_uid(ct)) == []
    assert PASSWORD not in caplog.text and PASSWORD not in result.reason
    after = (https.front.connections, https.front.failed_handshakes)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def _service_once(
    tmp_path: Path, extra: str, env: dict[str, str] | None = None
) -> tuple[str, str, list[str]]:
    """One CT through ``serve --once`` with the destination ``extra`` configures: the study
    UID, the log, and the SOP Instance UIDs of the outputs."""
    config = write_config(tmp_path, extra)
    uids = UidFactory(DEFAULT_UID_ROOT, "test-stow-e2e", uuid.uuid4().hex)
    source = tmp_path / "source"
    source.mkdir()
    copy_with_new_uids("CT_small.dcm", source, uids, "ct")
    study_uid, _ = copy_series(source, tmp_path / "INPUT/gateway_1")
    proc = start_service(config, "--once", "--once-timeout", "120", env=env)
    code, log = wait_service(proc, 150)
    assert code == 0, log
    outputs = ledger_rows(tmp_path / "STATE", "SELECT sop_instance_uid FROM outputs")
    assert outputs
    return study_uid, log, [o["sop_instance_uid"] for o in outputs]


@pytest.mark.parametrize("trusted", [True, False], ids=["its-ca", "another-ca"])
def test_the_service_sends_over_https_with_tls_ca_and_a_password_file(
    tmp_path: Path, orthanc_https: Https, trusted: bool
) -> None:
    """The service as a process, its destination https:// with ``tls_ca`` and the password
    in a ``password_file``, both relative to the config file's folder. With a CA that did
    not sign the server the send fails once (no retry) naming TLS, nothing is stored."""
    https = orthanc_https
    server = https.orthanc
    (tmp_path / "ca.pem").write_bytes((https.ca if trusted else https.other_ca).read_bytes())
    (tmp_path / "pacs-password").write_text(PASSWORD + "\n")
    extra = f"""
[pacs]
url = "{https.url}"
username = "{USER}"
password_file = "pacs-password"
tls_ca = "ca.pem"
timeout_seconds = 10
"""
    study_uid, log, outputs = _service_once(tmp_path, extra)
    assert PASSWORD not in log
    assert "unencrypted" not in log  # https: no warning
    state = tmp_path / "STATE"
    (run,) = ledger_rows(state, "SELECT * FROM runs WHERE study_uid=?", (study_uid,))
    (send,) = ledger_rows(state, "SELECT * FROM sends")  # one attempt, never retried
    assert send["destination"] == https.url
    if trusted:
        assert run["state"] == "sent", run["reason"]
        assert all(len(server.lookup(uid)) == 1 for uid in outputs)
    else:
        assert run["state"] == "send_failed" and send["state"] == "refused"
        assert "TLS handshake failed" in run["reason"] and "certificate" in send["reason"]
        assert all(server.lookup(uid) == [] for uid in outputs)


def _answer_every_instance_failed(reason: int) -> Callable[[bytes, str], dict[str, Any]]:
    """An answer for ``_Peer``: every instance of the request in the Failed SOP Sequence."""

    def answer(body: bytes, content_type: str) -> dict[str, Any]:
        from io import BytesIO

        from pydicom import dcmread

        boundary = content_type.rsplit("=", 1)[1].encode()
        parts = body.split(b"--" + boundary)[1:-1]
        uids = [
            str(dcmread(BytesIO(part.split(b"\r\n\r\n", 1)[1][:-2])).SOPInstanceUID)
            for part in parts
        ]
        return {"00081198": {"vr": "SQ", "Value": [_sop(uid, reason) for uid in uids]}}

    return answer


def test_the_service_records_each_failure_reason_with_its_meaning(tmp_path: Path) -> None:
    """A DICOMweb server answering 409 with Failure Reason 0xA700: the study and run reasons
    name it with its meaning, each instance keeps the code, ``study`` shows its meaning."""
    with _Peer(409, None, answer_for=_answer_every_instance_failed(0xA700)) as peer:
        study_uid, log, outputs = _service_once(tmp_path, f'[pacs]\nurl = "{peer.url}"\n')
    state = tmp_path / "STATE"
    (run,) = ledger_rows(state, "SELECT * FROM runs WHERE study_uid=?", (study_uid,))
    (study,) = ledger_rows(state, "SELECT * FROM studies WHERE study_uid=?", (study_uid,))
    text = status_text(0xA700)
    assert text == "0xA700 Refused: Out of Resources"
    assert run["state"] == "send_failed"
    assert f"failure statuses: {text} ({len(outputs)})" in run["reason"]
    assert text in study["reason"] and text in log
    items = ledger_rows(state, "SELECT sop_instance_uid, status, status_code FROM send_items")
    assert {(i["sop_instance_uid"], i["status"], i["status_code"]) for i in items} == {
        (uid, "failure", 0xA700) for uid in outputs
    }
    shown = run_cli("--config", str(tmp_path / "gateway.toml"), "study", "1", study_uid)
    assert shown.returncode == 0, shown.stderr
    for uid in outputs:
        assert f"{uid} failure {text}" in shown.stdout
