"""The development receiver: a real pynetdicom SCP fed by our sender over loopback."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from devtools.receiver import start_receiver
from devtools.sample import pydicom_file
from service.config import DEFAULT_UID_ROOT, PacsConfig
from service.fsutil import TMP_PREFIX
from service.sender import SendStatus, send_files
from service.uids import UidFactory
from tests.conftest import free_port


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[PacsConfig, Path]]:
    port = free_port()
    folder = tmp_path / "received"
    server = start_receiver(port, folder, ae_title="DEVRECEIVER")
    try:
        yield PacsConfig(host="127.0.0.1", port=port, ae_title="DEVRECEIVER"), folder
    finally:
        server.shutdown()


def new_instance(source: str, folder: Path, sop_uid: str | None = None) -> Path:
    uids = UidFactory(DEFAULT_UID_ROOT, "test-receiver", uuid.uuid4().hex)
    ds = dcmread(pydicom_file(source))
    ds.StudyInstanceUID = uids.uid("study")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids.uid("sop")
    if sop_uid is not None:  # the dataset's own value, as a hostile sender could set it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydicom: invalid UI value
            ds.SOPInstanceUID = sop_uid
    path = folder / f"{uuid.uuid4().hex}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_received_instances_are_stored_by_study_and_sop_uid(
    receiver: tuple[PacsConfig, Path], tmp_path: Path
) -> None:
    destination, folder = receiver
    sent = [new_instance(name, tmp_path) for name in ("CT_small.dcm", "MR_small.dcm")]
    result = send_files(destination, sent)
    assert result.status is SendStatus.SUCCESS, result.reason
    for path in sent:
        original = dcmread(path)
        stored_path = folder / original.StudyInstanceUID / f"{original.SOPInstanceUID}.dcm"
        stored = dcmread(stored_path)
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData
    assert not [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_unsafe_sop_instance_uid_is_refused(
    receiver: tuple[PacsConfig, Path], tmp_path: Path
) -> None:
    """A dataset whose SOP Instance UID is a path is answered 0xC000 and written nowhere."""
    destination, folder = receiver
    path = new_instance("CT_small.dcm", tmp_path, sop_uid="../../escape")
    result = send_files(destination, [path])
    assert result.status is SendStatus.FAILURE
    assert result.items[0].status_code == 0xC000
    assert not [p for p in tmp_path.rglob("*escape*")]
    assert not [p for p in folder.rglob("*") if p.is_file()]


def test_receiver_rejects_another_called_ae_title(
    receiver: tuple[PacsConfig, Path], tmp_path: Path
) -> None:
    destination, _ = receiver
    other = PacsConfig(host=destination.host, port=destination.port, ae_title="SOMEONE_ELSE")
    result = send_files(other, [new_instance("CT_small.dcm", tmp_path)])
    assert result.status is SendStatus.REJECTED
