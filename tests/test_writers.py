"""Output paths and atomic DICOM file writes (service.writers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, config, dcmread
from pydicom.dataelem import DataElement

from devtools.sample import pydicom_file
from service.errors import OutputError
from service.fsutil import TMP_PREFIX
from service.writers import encode_dataset, output_path, write_dataset, write_encoded
from tests.conftest import dciodvfy

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def _ct() -> Dataset:
    return dcmread(pydicom_file("CT_small.dcm"))


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_study_layout(tmp_path: Path) -> None:
    ds = _ct()
    path = output_path(tmp_path, "1", "study", ds)
    assert path == tmp_path / "gateway_1" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def test_flat_layout(tmp_path: Path) -> None:
    ds = _ct()
    path = output_path(tmp_path, "site-A_2", "flat", ds)
    assert path == tmp_path / "gateway_site-A_2" / f"{ds.SOPInstanceUID}.dcm"


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("SOPInstanceUID", "../../etc/passwd"),
        ("SOPInstanceUID", "1.2/3"),
        ("SOPInstanceUID", ".."),
        ("SOPInstanceUID", ""),
        ("SOPInstanceUID", "1.2.3\\4"),
        ("SOPInstanceUID", "1." + "2" * 70),
        ("SOPInstanceUID", "1.2.03"),
        ("StudyInstanceUID", "../1.2.3"),
        ("StudyInstanceUID", "/tmp"),
    ],
)
def test_hostile_uids_refused(tmp_path: Path, keyword: str, value: str) -> None:
    ds = _ct()
    ds.add(DataElement(keyword, "UI", value, validation_mode=config.IGNORE))
    with pytest.raises(OutputError):
        output_path(tmp_path, "1", "study", ds)


@pytest.mark.parametrize("gateway_id", ["..", "../x", "a/b", "", "x\x00"])
def test_hostile_gateway_id_refused(tmp_path: Path, gateway_id: str) -> None:
    with pytest.raises(OutputError):
        output_path(tmp_path, gateway_id, "flat", _ct())


def test_unknown_layout_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="layout"):
        output_path(tmp_path, "1", "by-patient", _ct())


def test_write_is_part10_and_leaves_no_temp_file(tmp_path: Path) -> None:
    ds = _ct()
    target = output_path(tmp_path, "1", "study", ds)
    write_dataset(ds, target)
    data = target.read_bytes()
    assert data[128:132] == b"DICM"  # PS3.10 §7.1 preamble + prefix
    back = dcmread(target)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert (back.pixel_array == ds.pixel_array).all()
    assert _temp_files(tmp_path) == []
    assert dciodvfy(target) == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    ds = _ct()
    ds.add(DataElement(0x00280010, "US", "not a number", validation_mode=config.IGNORE))
    target = tmp_path / "gateway_1" / "x.dcm"
    with pytest.raises(OutputError, match=r"Rows|integer"):
        write_dataset(ds, target)
    assert not target.exists()
    assert _temp_files(tmp_path) == []


def test_failed_rewrite_keeps_previous_file(tmp_path: Path) -> None:
    good = _ct()
    target = output_path(tmp_path, "1", "flat", good)
    write_dataset(good, target)
    before = target.read_bytes()
    bad = _ct()
    bad.add(DataElement(0x00280010, "US", "not a number", validation_mode=config.IGNORE))
    with pytest.raises(OutputError):
        write_dataset(bad, target)
    assert target.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_encoded_bytes_are_written_unchanged(tmp_path: Path) -> None:
    """The pipeline encodes once, gates those bytes and writes them: the file holds exactly
    what write_dataset would have written."""
    ds = _ct()
    data = encode_dataset(ds)
    target = output_path(tmp_path / "a", "1", "flat", ds)
    write_encoded(data, target)
    write_dataset(ds, output_path(tmp_path / "b", "1", "flat", ds))
    assert target.read_bytes() == data
    assert data == output_path(tmp_path / "b", "1", "flat", ds).read_bytes()
    assert dcmread(target).SOPInstanceUID == ds.SOPInstanceUID
    assert _temp_files(tmp_path) == []


def test_unencodable_dataset_is_an_output_error() -> None:
    bad = _ct()
    bad.add(DataElement(0x00280010, "US", "not a number", validation_mode=config.IGNORE))
    with pytest.raises(OutputError):
        encode_dataset(bad)
