"""The sender against three independent Storage SCPs, on both data paths.

dcmtk ``storescp`` (16 KB maximum PDU), Orthanc, and a pynetdicom SCP each receive the same
real files (512x512 CT slices, MR slices, a JPEG Baseline CR) over one association, and
each instance is checked at the receiver against the file it came from.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import cast

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, MRImageStorage
from pydicom.uid import SecondaryCaptureImageStorage as SC
from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE

from service import sender
from service.sender import SendStatus, send_files
from tests.conftest import free_port, shared_file
from tests.orthanc import Orthanc
from tests.peers import Peer, destination_at

PDU_16K = 16384


@pytest.fixture(params=["fast", "public"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sender, "FAST_PATH", request.param == "fast")
    return str(request.param)


@pytest.fixture
def real_files(tmp_path: Path) -> list[Path]:
    """Real files, saved again with the File Meta's SOP Instance UID made the data set's
    (PS3.10 §7.1; the ct-4-noise files had only their data set's UID replaced, and Orthanc
    rightly refuses such an instance with 0xA900)."""
    ct = [shared_file(f"series/ct-4-noise/IM-0001-000{i}.dcm") for i in (1, 2, 3, 4)]
    mr = [shared_file(f"series/mr-phantom-63/500100{i}.dcm") for i in (1, 2, 3)]
    files = []
    for index, path in enumerate([*ct, *mr, shared_file("cxr/siim-cr-pa-jpeg.dcm")]):
        ds = dcmread(path)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append(tmp_path / f"{index}-{path.name}")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def file_data_set(path: Path) -> bytes:
    """The bytes of ``path`` after its File Meta (PS3.10 §7.1)."""
    meta_length = int(
        dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    )
    return path.read_bytes()[128 + 4 + 12 + meta_length :]


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_same_instance(received: Dataset, original: Path) -> None:
    source = dcmread(original)
    assert received.SOPInstanceUID == source.SOPInstanceUID
    assert received.PixelData == source.PixelData
    assert received.Rows == source.Rows


def assert_all_stored(result: sender.SendResult, files: list[Path]) -> None:
    assert result.status is SendStatus.SUCCESS, result.reason
    assert [i.sop_instance_uid for i in result.items] == [uid_of(p) for p in files]
    assert [i.status_code for i in result.items] == [0] * len(files)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp: 16 KB maximum PDU, every transfer syntax, files kept bit for bit."""
    exe = shutil.which("storescp")
    assert exe, "storescp missing: run `make test-deps` (Debian package dcmtk)"
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    args = [exe, "-aet", "STORESCP", "--max-pdu", str(PDU_16K), "+xa", "+B", "-od", str(out)]
    env = {**os.environ, "TCP_NODELAY": "1"}  # see bench/send.py
    process = subprocess.Popen([*args, str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert process.poll() is None, "storescp exited"
            assert time.monotonic() < deadline, "storescp is not listening"
            time.sleep(0.05)
        yield port, out
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_dcmtk_storescp_with_a_16k_pdu(
    storescp: tuple[int, Path], real_files: list[Path], data_path: str
) -> None:
    port, out = storescp
    result = send_files(destination_at(port, "STORESCP", timeout=30), real_files)
    assert_all_stored(result, real_files)
    written = {str(dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert sorted(written) == sorted(uid_of(p) for p in real_files)
    for original in real_files:
        stored = written[uid_of(original)]
        assert file_data_set(stored) == file_data_set(original)  # +B: the bytes as received


def test_orthanc(orthanc: Orthanc, real_files: list[Path], data_path: str) -> None:
    result = send_files(destination_at(orthanc.dicom_port, orthanc.ae_title, 30), real_files)
    assert_all_stored(result, real_files)
    for original in real_files:
        [instance] = orthanc.lookup(uid_of(original))
        assert_same_instance(dcmread(BytesIO(orthanc.get_bytes(f"/instances/{instance}/file"))),
                             original)  # fmt: skip


def test_pynetdicom_scp_with_a_16k_pdu(
    start_peer: Callable[..., Peer], real_files: list[Path], data_path: str
) -> None:
    received: dict[str, bytes] = {}

    def store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        received[str(request.AffectedSOPInstanceUID)] = cast(BytesIO, request.DataSet).getvalue()
        return 0x0000

    peer = start_peer(
        on_store=store,
        sop_classes=(CTImageStorage, MRImageStorage, SC),
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
        max_pdu=PDU_16K,
    )
    result = send_files(peer.destination(timeout=30), real_files)
    assert_all_stored(result, real_files)
    assert received == {uid_of(p): file_data_set(p) for p in real_files}
    assert peer.connections == 1
