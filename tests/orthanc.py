"""A real Orthanc PACS for tests: ``from tests.orthanc import orthanc`` registers the fixture.

Orthanc (Debian package ``orthanc``, installed by ``make test-deps``) runs with its own
temporary configuration: temporary storage, free loopback ports, no plugins, no remote access.
``start_orthanc(folder, users={...})`` loads the DICOMweb plugin (Debian package
``orthanc-dicomweb``, root ``/dicom-web/``) and turns HTTP authentication on for those users.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ORTHANC_AET = "ORTHANC"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_DEADLINE_S = 30.0


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    ae_title: str
    process: subprocess.Popen[bytes]
    log: Path
    #: (username, password) for the REST API when authentication is on
    auth: tuple[str, str] | None = None

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb plugin's service root (when started with ``users``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def _request(self, path: str, data: bytes | None = None) -> urllib.request.Request:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=data,
            method="GET" if data is None else "POST",
        )
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return request

    def get(self, path: str) -> Any:
        """GET ``path`` from the REST API and decode the JSON answer."""
        with urllib.request.urlopen(self._request(path), timeout=10) as rsp:
            return json.load(rsp)

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` from the REST API as bytes (e.g. ``/instances/<id>/file``)."""
        with urllib.request.urlopen(self._request(path), timeout=10) as rsp:
            return bytes(rsp.read())

    def lookup(self, sop_instance_uid: str) -> list[str]:
        """Orthanc ids of the instances with ``sop_instance_uid`` (POST /tools/lookup)."""
        request = self._request("/tools/lookup", sop_instance_uid.encode())
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return [item["ID"] for item in json.load(rsp) if item["Type"] == "Instance"]


def start_orthanc(
    folder: Path, check_called_aet: bool = False, users: dict[str, str] | None = None
) -> Orthanc:
    """Start Orthanc with a configuration under ``folder``; wait until REST answers.

    ``users``: load the DICOMweb plugin and require HTTP Basic authentication as one of
    them (``RegisteredUsers``)."""
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    assert Path(exe).exists(), "Orthanc missing: run `make test-deps` (Debian package orthanc)"
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = {
        "Name": "gateway-tests",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "DicomCheckCalledAet": check_called_aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": users is not None,
        "Plugins": [],
        "DicomServerEnabled": True,
        "HttpServerEnabled": True,
        "StorageCompression": False,
    }
    auth = None
    if users is not None:
        assert DICOMWEB_PLUGIN.exists(), "run `make test-deps` (Debian package orthanc-dicomweb)"
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["RegisteredUsers"] = users
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        auth = next(iter(users.items()))
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = folder / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([exe, str(config_path)], stdout=out, stderr=subprocess.STDOUT)
    server = Orthanc(dicom_port, http_port, ORTHANC_AET, process, log, auth)
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{log.read_text()}")
        try:
            server.get("/system")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                stop_orthanc(server)
                raise RuntimeError(f"Orthanc did not answer in {START_DEADLINE_S:g} s") from None
            time.sleep(0.1)


def stop_orthanc(server: Orthanc) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=15)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One real Orthanc for the whole session (tests use fresh UIDs, so they do not collide)."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        stop_orthanc(server)
