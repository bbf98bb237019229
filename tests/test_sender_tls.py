"""TLS sends (PS3.15 Annex B.1) to a real pynetdicom SCP with certificates made by openssl."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from devtools.sample import pydicom_file
from service.config import PacsConfig
from service.sender import SendStatus, send_files
from tests.conftest import free_port
from tests.helpers import stored_uid


def openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    assert exe, "openssl missing (Debian package openssl)"
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path, name: str) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    folder.mkdir(parents=True)
    subj = f"/CN={name} test CA"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subj,
            "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)  # fmt: skip
    for who, san in (("server", "IP:127.0.0.1"), ("client", "DNS:gateway")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
                "-keyout", f"{who}.key", "-out", f"{who}.csr", cwd=folder)  # fmt: skip
        (folder / f"{who}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext",
                "-out", f"{who}.pem", cwd=folder)  # fmt: skip
    return {p.stem + p.suffix: p for p in folder.iterdir()}


@pytest.fixture
def tls_peer(tmp_path: Path) -> Iterator[tuple[int, dict[str, Path], list[str]]]:
    """A storage SCP that requires TLS with a client certificate from the same CA."""
    pki = make_pki(tmp_path / "pki", "site")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca.pem"]))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(pki["server.pem"]), str(pki["server.key"]))
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(stored_uid(event))
        return 0x0000

    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=context,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert server is not None
    yield port, pki, stored
    server.shutdown()


def ct_file() -> Path:
    return pydicom_file("CT_small.dcm")


def test_tls_send_with_client_certificate(
    tls_peer: tuple[int, dict[str, Path], list[str]],
) -> None:
    port, pki, stored = tls_peer
    destination = PacsConfig(
        host="127.0.0.1",
        port=port,
        ae_title="TLSPACS",
        timeout_seconds=10,
        tls_ca=str(pki["ca.pem"]),
        tls_cert=str(pki["client.pem"]),
        tls_key=str(pki["client.key"]),
    )
    result = send_files(destination, [ct_file()])
    assert result.status is SendStatus.SUCCESS, result.reason
    assert stored == [str(dcmread(ct_file(), stop_before_pixels=True).SOPInstanceUID)]


def test_tls_peer_with_an_untrusted_certificate_is_not_sent_to(
    tls_peer: tuple[int, dict[str, Path], list[str]], tmp_path: Path
) -> None:
    port, pki, stored = tls_peer
    other = make_pki(tmp_path / "other", "other")  # a CA the server was not signed by
    destination = PacsConfig(
        host="127.0.0.1",
        port=port,
        ae_title="TLSPACS",
        timeout_seconds=5,
        tls_ca=str(other["ca.pem"]),
        tls_cert=str(pki["client.pem"]),
        tls_key=str(pki["client.key"]),
    )
    result = send_files(destination, [ct_file()])
    assert result.status is SendStatus.REFUSED
    assert "TLS handshake failed" in result.reason
    assert result.items and all(i.status is not SendStatus.SUCCESS for i in result.items)
    assert stored == []


def test_missing_tls_files_are_an_error_value_not_an_exception(tmp_path: Path) -> None:
    destination = PacsConfig(
        host="127.0.0.1", port=free_port(), ae_title="X", tls_ca=str(tmp_path / "missing.pem")
    )
    result = send_files(destination, [ct_file()])
    assert result.status is SendStatus.ERROR
    assert "TLS" in result.reason
