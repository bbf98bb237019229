"""Lossy Image Compression carried to every derived image (PS3.3 C.7.6.1.1.5), on real
files: the CXR summary image (tests/test_cxr_outputs.py) and annotate's copies here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from service.models.annotate import AnnotateModel
from service.models.base import RunContext
from service.models.derived import LossyHistory, lossy_history
from service.models.dicomio import read_dicom
from service.uids import UidFactory
from tests.conftest import dciodvfy, shared_file
from tests.test_cxr import ROOT, study_of
from tests.test_pixels import PYDICOM_FILES


def annotated(path: Path) -> pydicom.Dataset:
    study = study_of(path)
    (copy,) = AnnotateModel().run(study, RunContext(UidFactory(ROOT, "1"), 1)).datasets
    return copy


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("cxr/siim-cr-pa-jpeg.dcm", LossyHistory(("ISO_10918_1",), ())),
        ("cxr/nema-rg1-pa-j2k.dcm", LossyHistory(("ISO_15444_1",), ("10",))),
        ("negative/cr-leg-j2k-lossless.dcm", None),
        ("cxr/cr-mono1-chest-nometa", None),
    ],
)
def test_history_of_real_files(path: str, expected: LossyHistory | None) -> None:
    assert lossy_history(read_dicom(shared_file(path))) == expected


def test_12_bit_jpeg_records_its_method_beside_the_recorded_ratio() -> None:
    ds = read_dicom(PYDICOM_FILES / "JPEG-lossy.dcm")  # "01", ratio 76, no method
    assert lossy_history(ds) == LossyHistory(("ISO_10918_1",), ("76",))


def test_a_decompressed_lossy_image_stays_lossy(tmp_path: Path) -> None:
    """dcmtk's dcmdjpeg writes the pixels uncompressed, keeping "01" and the method."""
    exe = shutil.which("dcmdjpeg")
    assert exe, "dcmdjpeg missing: run `make test-deps` (Debian package dcmtk)"
    plain = tmp_path / "plain.dcm"
    subprocess.run([exe, str(shared_file("cxr/siim-cr-pa-jpeg.dcm")), str(plain)], check=True)
    copy = annotated(plain)
    assert copy.LossyImageCompression == "01"
    assert copy.LossyImageCompressionMethod == "ISO_10918_1"


def test_annotate_appends_the_sources_own_lossy_step(tmp_path: Path) -> None:
    """A JPEG whose header records an earlier JPEG 2000 step (ratio 10): both steps, in
    order, one ratio each; the JPEG step's ratio is the encoded Pixel Data's."""
    ds = pydicom.dcmread(shared_file("cxr/siim-cr-pa-jpeg.dcm"))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_15444_1"
    ds.LossyImageCompressionRatio = "10"
    ds.save_as(tmp_path / "transcoded.dcm")
    copy = annotated(tmp_path / "transcoded.dcm")
    assert copy.LossyImageCompression == "01"
    assert list(copy.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
    ratio = 1024 * 1024 / len(ds.PixelData)
    assert [float(v) for v in copy.LossyImageCompressionRatio] == pytest.approx(
        [10, ratio], abs=0.01
    )
    copy.save_as(tmp_path / "copy.dcm", enforce_file_format=True)
    assert dciodvfy(tmp_path / "copy.dcm") == []
