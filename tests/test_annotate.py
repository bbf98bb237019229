"""The annotate model on real DICOM files (service.models.annotate)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from devtools.sample import pydicom_file
from service.models.annotate import AnnotateModel
from service.models.base import RunContext
from service.models.dicomio import read_dicom
from service.uids import UidFactory
from service.values import Instance, Study
from service.writers import output_path, write_dataset
from tests.conftest import dciodvfy, shared_file

ROOT = "1.2.826.0.1.3680043.10.999."


def _source(name: str) -> Path:
    return shared_file(name[len("shared:") :]) if name.startswith("shared:") else pydicom_file(name)


def _instance(path: Path) -> Instance:
    ds = read_dicom(path, stop_before_pixels=True)
    return Instance(
        path=path,
        size=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        modality=str(ds.get("Modality", "")),
    )


def _study(*paths: Path) -> Study:
    instances = [_instance(p) for p in paths]
    return Study("1", instances[0].study_instance_uid, paths[0].parent, instances)


def _ctx(study: Study, run_id: int = 1) -> RunContext:
    return RunContext(UidFactory(ROOT, "1", study.study_uid, str(run_id)), run_id)


SOURCES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "shared:series/mr-phantom-63/5001001.dcm",
    "shared:cxr/siim-cr-pa-jpeg.dcm",
    "shared:cxr/siim-cr-pa-monochrome1.dcm",
    "SC_rgb_rle_2frame.dcm",
    "shared:series/ct-4-noise/IM-0001-0001.dcm",
    "shared:cxr/nema-rg1-pa-j2k.dcm",
    "shared:cxr/cr-mono1-chest-nometa",
    "shared:negative/cr-leg-j2k-lossless.dcm",
]


@pytest.mark.parametrize("name", SOURCES)
def test_derived_copy_is_valid_and_new(tmp_path: Path, name: str) -> None:
    path = _source(name)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    study = _study(path)
    model = AnnotateModel()
    assert model.ready().ok
    assert model.applies(study).ok
    result = model.run(study, _ctx(study))
    assert len(result.datasets) == 1
    assert result.skipped_instances == {}

    target = output_path(tmp_path, "1", "study", result.datasets[0])
    write_dataset(result.datasets[0], target)
    out, src = dcmread(target), read_dicom(path)

    # Validity (PS3.3 IODs): no dciodvfy error, even where the source itself has some
    # (invalid copied values, missing Type 2 attributes, unmet Type 2C conditions).
    errors = dciodvfy(target)
    if name == "SC_rgb_rle_2frame.dcm":  # pydicom's test file: NumberOfFrames, kept as is
        errors = [e for e in errors if "Number of Frames" not in e and "NumberOfFrames" not in e]
    assert errors == []
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    # New UIDs from the configured root, same study and patient.
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        assert out[keyword].value.startswith(ROOT)
        assert out[keyword].value != src[keyword].value
    assert out.SOPClassUID == src.SOPClassUID
    assert out.StudyInstanceUID == src.StudyInstanceUID
    assert (out.PatientID or "") == src.get("PatientID", "")  # Type 2: added empty if absent
    assert result.findings == {"instances": 1, "series": [out.SeriesInstanceUID]}

    # Derivation attributes (PS3.3 C.7.6.1).
    assert list(out.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert out.SeriesDescription.startswith("AI annotated")
    assert len(out.SeriesDescription) <= 64
    assert out.BurnedInAnnotation == "YES"
    ref = out.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == src.SOPClassUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"

    # Text burned in: same shape, different pixels; the input file is untouched.
    assert out.pixel_array.shape == src.pixel_array.shape
    assert not np.array_equal(out.pixel_array, src.pixel_array)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "shared:cxr/siim-cr-pa-monochrome1.dcm"], ids=["mono2", "mono1"]
)
def test_text_is_drawn_in_the_displayed_bright_value(name: str) -> None:
    """MONOCHROME1 shows low stored values bright (PS3.3 C.7.6.3.1.2)."""
    path = _source(name)
    study = _study(path)
    out = AnnotateModel().run(study, _ctx(study)).datasets[0].pixel_array
    src = dcmread(path).pixel_array
    bright = src.min() if dcmread(path).PhotometricInterpretation == "MONOCHROME1" else src.max()
    assert np.count_nonzero(out == bright) > np.count_nonzero(src == bright) + 50
    assert src.min() <= out.min() and out.max() <= src.max()  # stored range respected


def test_uids_are_deterministic_per_run() -> None:
    study = _study(pydicom_file("CT_small.dcm"))
    model = AnnotateModel()

    def uids(run_id: int) -> tuple[str, str]:
        ds = model.run(study, _ctx(study, run_id)).datasets[0]
        return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)

    assert uids(1) == uids(1)
    assert uids(2) != uids(1)


def test_one_new_series_per_source_series() -> None:
    study = _study(pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm"))
    result = AnnotateModel().run(study, _ctx(study))
    new_series = {str(ds.SeriesInstanceUID) for ds in result.datasets}
    assert len(new_series) == 2
    assert sorted(result.findings["series"]) == sorted(new_series)
    assert new_series.isdisjoint({i.series_instance_uid for i in study.instances})


def test_non_image_instances_are_skipped_with_a_reason() -> None:
    sr = pydicom_file("test-SR.dcm")
    study = _study(pydicom_file("MR_small.dcm"), sr)
    model = AnnotateModel()
    assert model.applies(study).ok
    result = model.run(study, _ctx(study))
    assert len(result.datasets) == 1
    sr_uid = str(dcmread(sr, stop_before_pixels=True).SOPInstanceUID)
    assert "not an image" in result.skipped_instances[sr_uid]


def test_study_without_images_does_not_apply() -> None:
    verdict = AnnotateModel().applies(_study(pydicom_file("test-SR.dcm")))
    assert not verdict.ok
    assert "not an image" in verdict.reason


def test_enhanced_multiframe_without_verified_copy_is_refused(tmp_path: Path) -> None:
    """An Enhanced multi-frame MR (highdicom's Legacy Converted Enhanced MR of MR_small,
    functional groups per PS3.3 C.7.6.16) is skipped with the reason, not copied invalid."""
    src = dcmread(pydicom_file("MR_small.dcm"))
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        [src],
        series_instance_uid=ROOT + "1.1",
        series_number=5,
        sop_instance_uid=ROOT + "1.2",
        instance_number=1,
    )
    path = tmp_path / "enhanced-mr.dcm"
    enhanced.save_as(path)
    study = _study(path)
    model = AnnotateModel()
    verdict = model.applies(study)
    assert not verdict.ok
    assert "legacy-converted-enhanced-mr-image is not supported" in verdict.reason
    result = model.run_part(study, _ctx(study))
    assert result.datasets == []
    assert "Frame Type" in result.skipped_instances[ROOT + "1.2"]
