"""Pixel data decoding: each compressed transfer syntax in pydicom's test files decodes with
the installed (permissive) decoders; 12-bit JPEG Extended through GDCM equals dcmtk's
decoding; a syntax without a decoder is refused with its name."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MPEG2MPML, UID, JPEGExtended12Bit

from service.errors import InputError
from service.models.annotate import AnnotateModel
from service.models.cxr import check_instance, load_radiograph
from service.models.dicomio import read_dicom
from service.models.pixels import decode_pixels, undecodable_reason
from tests.conftest import shared_file
from tests.test_cxr import instance, study_of

#: One of pydicom's test files per compressed transfer syntax among them (PS3.5 A.4).
SAMPLES = {
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "JPEG-lossy.dcm",  # JPEG Extended, 12-bit
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_16.dcm",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",  # JPEG 2000
    "1.2.840.10008.1.2.5": "SC_rgb_rle_16bit.dcm",  # RLE Lossless
}


#: pydicom's own test files, shipped in the package (its larger pydicom-data set is
#: downloaded on demand, which tests must not do).
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def get_testdata_file(name: str) -> str:
    return str(PYDICOM_FILES / name)


def dcmtk(tool: str, *args: str) -> None:
    exe = shutil.which(tool)
    assert exe, f"{tool} missing: run `make test-deps` (Debian package dcmtk)"
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=120)


def compressed_syntaxes_in_pydicom_test_files() -> set[str]:
    found = set()
    for path in sorted(PYDICOM_FILES.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        except Exception:  # a deliberately broken test file
            continue
        if syntax.is_transfer_syntax and syntax.is_compressed and syntax.is_encapsulated:
            found.add(str(syntax))
    return found


def test_samples_cover_every_compressed_syntax_in_pydicom_test_files() -> None:
    assert compressed_syntaxes_in_pydicom_test_files() == set(SAMPLES)


@pytest.mark.parametrize("syntax", sorted(SAMPLES))
def test_each_compressed_syntax_decodes(syntax: str) -> None:
    path = get_testdata_file(SAMPLES[syntax])
    ds = read_dicom(Path(path))
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert undecodable_reason(ds) == ""
    pixels = decode_pixels(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape: tuple[int, ...] = (frames,) if frames > 1 else ()
    shape += (int(ds.Rows), int(ds.Columns))
    shape += (int(ds.SamplesPerPixel),) if int(ds.SamplesPerPixel) > 1 else ()
    assert pixels.shape == shape
    assert np.ptp(pixels) > 0


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPGExtended.dcm"])
def test_12_bit_jpeg_extended_equals_dcmtk(name: str, tmp_path: Path) -> None:
    """GDCM's 12-bit IJG codec gives dcmtk's pixels exactly, and pydicom's reference values
    for these files."""
    path = get_testdata_file(name)
    dcmtk("dcmdjpeg", path, str(tmp_path / "plain.dcm"))
    ours = decode_pixels(read_dicom(Path(path)))
    np.testing.assert_array_equal(ours, pydicom.dcmread(tmp_path / "plain.dcm").pixel_array)
    assert ours[420, 140] == 244 and ours[230, 120] == 95


def test_12_bit_jpeg_extended_chest_radiograph_is_read_by_the_cxr_model(tmp_path: Path) -> None:
    """A real 10-bit chest CR compressed by dcmtk as 12-bit JPEG Extended (Process 4)."""
    source = shared_file("cxr/cr-mono1-chest-nometa")
    dcmtk("dcmcjpeg", "+ee", "-f", str(source), str(tmp_path / "cr12.dcm"))
    dcmtk("dcmdjpeg", str(tmp_path / "cr12.dcm"), str(tmp_path / "plain.dcm"))
    ds = read_dicom(tmp_path / "cr12.dcm")
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.BitsStored == 12
    np.testing.assert_array_equal(
        decode_pixels(ds), pydicom.dcmread(tmp_path / "plain.dcm").pixel_array
    )
    ours = load_radiograph(instance(tmp_path / "cr12.dcm")).input
    original = load_radiograph(instance(source)).input
    assert np.abs(ours - original).mean() < 10  # of [-1024, 1024]: lossy, same picture


def relabelled(tmp_path: Path, syntax: str) -> Path:
    """The JPEG chest radiograph with its encapsulated pixel data declared as ``syntax``."""
    ds = pydicom.dcmread(shared_file("cxr/siim-cr-pa-jpeg.dcm"))
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path = tmp_path / "relabelled.dcm"
    ds.save_as(path)
    return path


def test_a_syntax_without_decoder_is_refused_with_its_name(tmp_path: Path) -> None:
    path = relabelled(tmp_path, MPEG2MPML)
    expected = "cannot decode MPEG2 Main Profile / Main Level"
    assert expected in undecodable_reason(read_dicom(path))
    with pytest.raises(InputError, match=expected):
        decode_pixels(read_dicom(path))
    assert expected in check_instance(instance(path))
    verdict = AnnotateModel().applies(study_of(path))
    assert not verdict.ok and expected in verdict.reason


def test_a_stream_no_decoder_can_read_fails_naming_the_syntax() -> None:
    path = get_testdata_file("JPEG2000-embedded-sequence-delimiter.dcm")
    with pytest.raises(InputError, match="cannot decode JPEG 2000 Image Compression: "):
        decode_pixels(read_dicom(Path(path)))
