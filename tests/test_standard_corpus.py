"""``annotate`` over a corpus of real DICOM files, checked by dciodvfy (dicom3tools): no
output may carry a dciodvfy error its source did not have (errors compared without their
element path), and each output passes the gate's checks of its IOD (PS3.3 Annex A).

Corpus: pydicom's bundled test files, the files of the pydicom-data package (installed by
requirements-dev.txt: Enhanced CT/MR, US, MR, CT, SC with LUTs) and the shared real files
(../shared/data)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from devtools.standard_tables import main as standard_tables_main
from service.config import CxrConfig
from service.conformance import check_file
from service.dicomrules import iod_of, requirements, uses_functional_groups
from service.models.annotate import AnnotateModel
from service.models.cxr import CxrModel
from service.writers import output_path, write_dataset
from tests.conftest import dciodvfy, shared_file
from tests.test_annotate import _ctx, _study
from tests.test_cxr import study_of, write_checkpoint

#: pydicom's own test files (installed with pydicom).
BUNDLED = [
    "CT_small.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
    "examples_overlay.dcm",
    "ExplVR_BigEnd.dcm",
    "examples_jpeg2k.dcm",
    "examples_rgb_color.dcm",
    "examples_ybr_color.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "JPEG2000.dcm",
    "image_dfl.dcm",
    "GDCMJ2K_TextGBR.dcm",
]
#: pydicom-data files (github.com/pydicom/pydicom-data), from pydicom's data cache.
EXTERNAL = [
    "eCT_Supplemental.dcm",
    "emri_small.dcm",
    "emri_small_big_endian.dcm",
    "US1_UNCR.dcm",
    "MR2_UNCR.dcm",
    "693_UNCR.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "mlut_18.dcm",
    "vlut_04.dcm",
    "color-pl.dcm",
]
SHARED = [
    "cxr/siim-cr-pa-jpeg.dcm",
    "cxr/siim-cr-pa-monochrome1.dcm",
    "cxr/nema-rg1-pa-j2k.dcm",
    "cxr/cr-mono1-chest-nometa",
    "negative/dx-thorax-lateral-small.dcm",
    "negative/cr-leg-j2k-lossless.dcm",
    "series/ct-4-noise/IM-0001-0001.dcm",
    "series/mr-phantom-63/5001001.dcm",
]
#: Sources annotate refuses, with a fragment of the reason.
REFUSED = {
    "emri_small.dcm": "Enhanced multi-frame IOD enhanced-mr-image is not supported",
    "emri_small_big_endian.dcm": "Enhanced multi-frame IOD enhanced-mr-image is not supported",
    "color-pl.dcm": "not a storage SOP class of the standard",
}


def _path(name: str) -> Path:
    if name in BUNDLED or name in EXTERNAL:
        found = get_testdata_file(name)
        assert isinstance(found, str), f"{name} missing: pydicom-data is not installed (make venv)"
        return Path(found)
    return shared_file(name)


_TAG = re.compile(r"\(0x[0-9a-f]{4},0x[0-9a-f]{4}\)|\[\d+\]|\s+", re.IGNORECASE)


def _normal(line: str) -> str:
    """An error line without its element path (tags, item numbers)."""
    return _TAG.sub(" ", line).strip()


def _new_errors(source: Path, output: Path) -> list[str]:
    """The dciodvfy errors of ``output`` that ``source`` does not have."""
    known = {_normal(line) for line in dciodvfy(source)}
    return [line for line in dciodvfy(output) if _normal(line) not in known]


@pytest.mark.parametrize("name", BUNDLED + EXTERNAL + SHARED)
def test_annotated_copy_adds_no_dciodvfy_error(name: str, tmp_path: Path) -> None:
    source = _path(name)
    study = _study(source)
    result = AnnotateModel().run_part(study, _ctx(study))
    if name in REFUSED:
        assert result.datasets == []
        assert REFUSED[name] in next(iter(result.skipped_instances.values()))
        return
    assert result.skipped_instances == {}
    [ds] = result.datasets
    target = output_path(tmp_path, "1", "study", ds)
    write_dataset(ds, target)
    assert _new_errors(source, target) == []
    if not dciodvfy(source):  # a valid source gives a copy the gate passes
        sop = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert check_file(target, source_sop_uids={sop}) == []


def test_enhanced_ct_copy_keeps_what_its_iod_requires(tmp_path: Path) -> None:
    """PS3.3 A.38.1: functional groups and dimensions kept; Image Type and every Frame Type
    value 1 DERIVED, value 2 PRIMARY (C.8.16.1); Burned In Annotation NO (C.8.15.2)."""
    source = _path("eCT_Supplemental.dcm")
    src = dcmread(source)
    study = _study(source)
    [ds] = AnnotateModel().run(study, _ctx(study)).datasets
    target = output_path(tmp_path, "1", "study", ds)
    write_dataset(ds, target)
    out = dcmread(target)
    for keyword in (
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DimensionOrganizationSequence",
        "DimensionIndexSequence",
    ):
        assert len(out[keyword].value) == len(src[keyword].value), keyword
    assert list(out.ImageType[:2]) == ["DERIVED", "PRIMARY"]
    assert list(out.ImageType[2:]) == list(src.ImageType[2:])
    frame_types = [
        item.FrameType
        for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
        for group in out[keyword].value
        for item in group.get("CTImageFrameTypeSequence", [])
    ]
    assert frame_types and all(ft[0] == "DERIVED" for ft in frame_types)
    assert out.BurnedInAnnotation == "NO"
    assert check_file(target, source_sop_uids={src.SOPInstanceUID}) == []
    assert _new_errors(source, target) == []


def test_tables_are_generated_from_the_pinned_standard_data() -> None:
    """service/standard/*.json are what devtools/standard_tables.py makes of highdicom's data."""
    assert standard_tables_main(["--check"]) == 0
    assert iod_of("1.2.840.10008.5.1.4.1.1.2.1") == "enhanced-ct-image"
    assert uses_functional_groups("1.2.840.10008.5.1.4.1.1.4.1")  # Enhanced MR
    assert not uses_functional_groups("1.2.840.10008.5.1.4.1.1.2")  # CT
    ct = {(r.path, r.keyword): r.type for r in requirements("1.2.840.10008.5.1.4.1.1.2")}
    assert ct[((), "KVP")] == "2"  # CT Image Module, PS3.3 C.8.2.1
    assert ct[((), "ImageType")] == "1"  # Type 3 in General Image, 1 in CT Image
    assert ct[((), "FrameOfReferenceUID")] == "1"  # PS3.3 C.7.4.1


#: Every real chest radiograph of the shared data (JPEG Baseline, MONOCHROME1, lossy JPEG 2000,
#: a stream without File Meta) through the CXR model.
CHEST = (
    "cxr/siim-cr-pa-jpeg.dcm",
    "cxr/siim-cr-pa-monochrome1.dcm",
    "cxr/nema-rg1-pa-j2k.dcm",
    "cxr/cr-mono1-chest-nometa",
)


@pytest.fixture(scope="module")
def cxr_model(tmp_path_factory: pytest.TempPathFactory) -> CxrModel:
    weights = write_checkpoint(tmp_path_factory.mktemp("weights") / "weights")
    return CxrModel(CxrConfig(weights=str(weights), device="cpu"))


@pytest.mark.parametrize("name", CHEST)
def test_cxr_outputs_add_no_dciodvfy_error(name: str, cxr_model: CxrModel, tmp_path: Path) -> None:
    source = shared_file(name)
    study = study_of(source)
    assert cxr_model.applies(study).ok
    result = cxr_model.run(study, _ctx(study))
    assert len(result.datasets) == 2  # the SR and the summary image
    for ds in result.datasets:
        target = output_path(tmp_path, "1", "study", ds)
        write_dataset(ds, target)
        assert _new_errors(source, target) == [], (name, ds.Modality)
        assert check_file(target, source_sop_uids=study.sop_uids) == []
