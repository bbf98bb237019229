"""A real Orthanc PACS for tests: ``from tests.orthanc import orthanc`` registers the fixture.

Orthanc (Debian package ``orthanc``, installed by ``make test-deps``) runs with its own
temporary configuration: temporary storage, free loopback ports, no plugins, no remote access.
"""

from __future__ import annotations

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
START_DEADLINE_S = 30.0


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    ae_title: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> Any:
        """GET ``path`` from the REST API and decode the JSON answer."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return json.load(rsp)

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` from the REST API as bytes (e.g. ``/instances/<id>/file``)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return bytes(rsp.read())

    def lookup(self, sop_instance_uid: str) -> list[str]:
        """Orthanc ids of the instances with ``sop_instance_uid`` (POST /tools/lookup)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/lookup",
            data=sop_instance_uid.encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return [item["ID"] for item in json.load(rsp) if item["Type"] == "Instance"]


def start_orthanc(folder: Path, check_called_aet: bool = False) -> Orthanc:
    """Start Orthanc with a configuration under ``folder``; wait until REST answers."""
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
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomServerEnabled": True,
        "HttpServerEnabled": True,
        "StorageCompression": False,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = folder / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([exe, str(config_path)], stdout=out, stderr=subprocess.STDOUT)
    server = Orthanc(dicom_port, http_port, ORTHANC_AET, process, log)
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
