"""Shared fixtures: real data from ../shared/data, dciodvfy, free ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason when absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test data not available: {path} (see ../shared/data/README.md)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dciodvfy(path: Path) -> list[str]:
    """Run dicom3tools' dciodvfy; return its error lines (empty when the object passes)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy missing: run `make test-deps` (Debian package dicom3tools)"
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


pytest_plugins = [
    "tests.orthanc",  # the session-scoped `orthanc` fixture (a real Orthanc)
    "tests.peers",  # `start_peer`, `start_proxy` (a trickling PACS), `ct`/`mr` sources
    "tests.postgres",  # the session-scoped `postgres` fixture (a real PostgreSQL)
    "tests.cloudmount",  # `s3_server` (moto on loopback), `s3_mount` (s3fs, FUSE)
]
