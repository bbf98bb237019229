"""The output conformance gate, on real objects: a derived CT, a highdicom TID 1500
Comprehensive 3D SR and a highdicom Secondary Capture image, all derived from pydicom's
CT_small.dcm; each is checked intact (and by dciodvfy), then broken one way at a time."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, config, dcmread, dcmwrite
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes

from devtools.sample import pydicom_file
from service.conformance import (
    check_dataset,
    check_datasets,
    check_file,
    check_files,
    quarantine_file,
)
from service.errors import OutputError
from service.uids import UidFactory
from service.writers import encode_dataset, write_encoded
from tests.conftest import dciodvfy

UIDS = UidFactory("1.2.826.0.1.3680043.10.999.", "gateway-1", "test-conformance")


def source_ct() -> Dataset:
    return dcmread(pydicom_file("CT_small.dcm"))


SOURCE_UIDS = {str(source_ct().SOPInstanceUID)}


def derived_ct() -> Dataset:
    """A derived copy of CT_small (same SOP class, new series and instance)."""
    src = source_ct()
    ds = copy.deepcopy(src)
    ds.SOPInstanceUID = UIDS.uid("ct")
    ds.SeriesInstanceUID = UIDS.uid("series", "ct")
    ds.SeriesNumber = 901
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.DerivationDescription = "test derivation"
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceImageSequence = [ref]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def summary_sc() -> Dataset:
    """A highdicom Secondary Capture summary image of the CT_small study."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_ct(),
        pixel_array=np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),
        series_instance_uid=UIDS.uid("series", "sc"),
        series_number=902,
        sop_instance_uid=UIDS.uid("sc"),
        instance_number=1,
        manufacturer="Test Gateway",
    )
    sc.Laterality = ""  # Type 2C (PS3.3 C.7.3.1); dciodvfy requires it
    return sc


def measurement_sr(extra_evidence: tuple[Dataset, ...] = ()) -> Dataset:
    """A highdicom TID 1500 Measurement Report with one area measured on CT_small."""
    ct = source_ct()
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[10.0, 10.0], [40.0, 10.0], [40.0, 40.0], [10.0, 10.0]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=ct.SOPClassUID,
            referenced_sop_instance_uid=ct.SOPInstanceUID,
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=UIDS.uid("roi"), identifier="ROI 1"),
        referenced_region=region,
        measurements=[
            hd.sr.Measurement(name=codes.SCT.Area, value=450.0, unit=codes.UCUM.SquareMillimeter)
        ],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=UIDS.uid("device"), name="test model"
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[ct, *extra_evidence],
        content=report,
        series_instance_uid=UIDS.uid("series", "sr"),
        series_number=903,
        sop_instance_uid=UIDS.uid("sr"),
        instance_number=1,
        manufacturer="Test Gateway",
    )


BUILDERS: dict[str, Callable[[], Dataset]] = {
    "derived-ct": derived_ct,
    "sc": summary_sc,
    "sr": measurement_sr,
}


def write(ds: Dataset, folder: Path, enforce: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    dcmwrite(path, ds, enforce_file_format=enforce)
    return path


def set_unchecked(ds: Dataset, keyword: str, value: str) -> None:
    """Set an invalid value without pydicom's own value validation (as a buggy writer would)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)


def has(problems: list[str], *fragments: str) -> bool:
    return any(all(f in p for f in fragments) for p in problems)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_objects_we_build_pass_the_gate_and_dciodvfy(kind: str, tmp_path: Path) -> None:
    path = write(BUILDERS[kind](), tmp_path)
    seen: set[str] = set()
    assert check_file(path, source_sop_uids=SOURCE_UIDS, seen_uids=seen) == []
    assert seen == {path.stem}
    assert dciodvfy(path) == []


def test_sr_references_checked_in_content_and_evidence(tmp_path: Path) -> None:
    path = write(measurement_sr(), tmp_path)
    ct_uid = next(iter(SOURCE_UIDS))
    problems = check_file(path, source_sop_uids=set())
    assert has(problems, "ReferencedSOPSequence", "unknown SOP instance", ct_uid)
    # once from the content item (IMAGE in the region), once from the evidence sequence
    assert len([p for p in problems if ct_uid in p]) == 2


def test_sr_may_reference_another_object_of_the_same_run(tmp_path: Path) -> None:
    sc = summary_sc()
    write(sc, tmp_path)
    path = write(measurement_sr(extra_evidence=(sc,)), tmp_path)
    assert dciodvfy(path) == []
    problems = check_file(path, source_sop_uids=SOURCE_UIDS)
    assert has(problems, "unknown SOP instance", str(sc.SOPInstanceUID))
    run_uids = {str(sc.SOPInstanceUID), str(path.stem)}
    assert check_file(path, source_sop_uids=SOURCE_UIDS, run_sop_uids=run_uids) == []


def _drop_study_uid(ds: Dataset) -> None:
    del ds.StudyInstanceUID


def _long_uid(ds: Dataset) -> None:
    set_unchecked(ds, "SeriesInstanceUID", "1.2." + "3" * 61)  # 65 characters


def _leading_zero_in_sequence(ds: Dataset) -> None:
    set_unchecked(ds.SourceImageSequence[0], "ReferencedSOPClassUID", "1.02.3")


def _unknown_source(ds: Dataset) -> None:
    ds.SourceImageSequence[0].ReferencedSOPInstanceUID = UIDS.uid("not", "a", "source")


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _source_uid_reused(ds: Dataset) -> None:
    ds.SOPInstanceUID = next(iter(SOURCE_UIDS))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _empty_type1(ds: Dataset) -> None:
    ds.Modality = ""


def _no_type2(ds: Dataset) -> None:
    del ds.PatientBirthDate


def _no_rows(ds: Dataset) -> None:
    del ds.Rows


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (
            _drop_study_uid,
            ("StudyInstanceUID missing", "Type 1", "module general-study of IOD ct-image"),
        ),
        (_long_uid, ("SeriesInstanceUID", "not a valid UID", "1.2.333")),
        (_leading_zero_in_sequence, ("ReferencedSOPClassUID", "'1.02.3'", "not a valid UID")),
        (_unknown_source, ("SourceImageSequence", "unknown SOP instance")),
        (_short_pixels, ("PixelData holds 16384 bytes", "need 32768")),
        (_source_uid_reused, ("UID of a source instance",)),
        (_empty_type1, ("Modality is empty", "Type 1", "module general-series")),
        (_no_type2, ("PatientBirthDate missing", "Type 2", "module patient")),
        (_no_rows, ("Rows missing", "module image-pixel")),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_broken_derived_image_is_reported(
    breakage: Callable[[Dataset], None], expected: tuple[str, ...], tmp_path: Path
) -> None:
    ds = derived_ct()
    breakage(ds)
    path = write(ds, tmp_path)
    problems = check_file(path, source_sop_uids=SOURCE_UIDS)
    assert has(problems, *expected), problems


def test_file_meta_mismatch_is_reported(tmp_path: Path) -> None:
    ds = derived_ct()
    ds.file_meta.MediaStorageSOPInstanceUID = UIDS.uid("other")
    path = write(ds, tmp_path, enforce=False)  # enforce_file_format would repair the meta
    problems = check_file(path, source_sop_uids=SOURCE_UIDS)
    assert has(problems, "MediaStorageSOPInstanceUID", "differs from SOPInstanceUID")


def test_missing_file_meta_is_reported(tmp_path: Path) -> None:
    ds = derived_ct()
    del ds.file_meta
    path = tmp_path / "no-meta.dcm"
    dcmwrite(path, ds, implicit_vr=True, little_endian=True)  # preamble, DICM, no meta
    assert has(check_file(path, source_sop_uids=SOURCE_UIDS), "TransferSyntaxUID", "missing")
    ds.preamble = None  # a bare data set stream (ACR-NEMA style): no preamble, no DICM
    dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert has(check_file(path, source_sop_uids=SOURCE_UIDS), "not a readable DICOM file")


def test_invalid_person_name_is_reported_without_its_value(tmp_path: Path) -> None:
    ds = derived_ct()
    secret = "Confidential" * 10  # PN components hold at most 64 characters
    set_unchecked(ds, "PatientName", secret)
    problems = check_file(write(ds, tmp_path), source_sop_uids=SOURCE_UIDS)
    assert has(problems, "PatientName", "not valid for VR PN")
    assert not any("Confidential" in p for p in problems)


def test_sr_root_must_be_a_complete_container(tmp_path: Path) -> None:
    ds = measurement_sr()
    ds.ValueType = "TEXT"
    del ds.CompletionFlag
    problems = check_file(write(ds, tmp_path), source_sop_uids=SOURCE_UIDS)
    assert has(problems, "not 'CONTAINER'")
    assert has(problems, "CompletionFlag missing", "module sr-document-general")


def test_duplicate_sop_instance_uid_across_files(tmp_path: Path) -> None:
    first = write(derived_ct(), tmp_path / "a")
    second = write(derived_ct(), tmp_path / "b")
    seen: set[str] = set()
    assert check_file(first, source_sop_uids=SOURCE_UIDS, seen_uids=seen) == []
    problems = check_file(second, source_sop_uids=SOURCE_UIDS, seen_uids=seen)
    assert problems == [f"SOPInstanceUID {first.stem} is used by another output object"]
    findings = check_files([first, second], source_sop_uids=SOURCE_UIDS)
    assert [f.path for f in findings] == [second]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_truncated_file_is_a_problem_not_an_exception(kind: str, tmp_path: Path) -> None:
    path = write(BUILDERS[kind](), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    problems = check_file(path, source_sop_uids=SOURCE_UIDS)
    assert problems, "a file cut in half must not pass"
    assert has(problems, "truncated") or has(problems, "not a readable DICOM file"), problems


@pytest.mark.parametrize(
    "content", [b"", b"not a DICOM file\n" * 40, b"\x00" * 128 + b"DICM" + b"\xff" * 64]
)
def test_junk_is_a_problem_not_an_exception(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(content)
    assert check_file(path, source_sop_uids=SOURCE_UIDS)


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    problems = check_file(tmp_path / "absent.dcm", source_sop_uids=SOURCE_UIDS)
    assert has(problems, "cannot read output file")


def test_quarantine_moves_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "OUTPUT" / "gateway_7" / "1.2.3"
    out.mkdir(parents=True)
    quarantine = tmp_path / "QUARANTINE"
    moved = []
    for content in (b"first", b"second", b"third"):
        path = out / "1.2.3.4.dcm"
        path.write_bytes(content)
        moved.append(quarantine_file(path, quarantine, "7"))
        assert not path.exists()
    folder = quarantine / "gateway_7"
    assert moved == [folder / "1.2.3.4.dcm", folder / "1.2.3.4-1.dcm", folder / "1.2.3.4-2.dcm"]
    assert [p.read_bytes() for p in moved] == [b"first", b"second", b"third"]


def test_quarantine_refuses_an_unsafe_gateway_id(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"data")
    with pytest.raises(OutputError):
        quarantine_file(path, tmp_path / "Q", "../escape")
    assert path.read_bytes() == b"data"
    assert not (tmp_path / "Q").exists()


def test_same_invalid_value_is_reported_in_every_item(tmp_path: Path) -> None:
    """Identical raw values are checked once, but each occurrence is still reported."""
    ds = derived_ct()
    second = copy.deepcopy(ds.SourceImageSequence[0])
    ds.SourceImageSequence.append(second)
    for item in ds.SourceImageSequence:
        set_unchecked(item, "ReferencedSOPClassUID", "1.02.3")
    problems = check_file(write(ds, tmp_path), source_sop_uids=SOURCE_UIDS)
    assert sum("'1.02.3'" in p for p in problems) == 2, problems


def test_file_encoded_differently_is_compared_element_by_element(tmp_path: Path) -> None:
    """pydicom's rtdose.dcm does not re-encode to the same bytes; its round trip is then
    compared element by element and passes (only its values are reported)."""
    source = pydicom_file("rtdose.dcm")
    ds = dcmread(source)
    again = io.BytesIO()
    dcmwrite(again, ds, enforce_file_format=True)
    assert again.getvalue() != source.read_bytes()
    problems = check_file(source, source_sop_uids=SOURCE_UIDS)
    assert problems and not has(problems, "round-trip"), problems


def legacy_enhanced_ct() -> Dataset:
    """An Enhanced multi-frame image built by highdicom from CT_small: the Legacy Converted
    Enhanced CT IOD (PS3.3 A.70), with functional groups and dimension sequences."""
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        [source_ct()],
        series_instance_uid=UIDS.uid("series", "legacy"),
        series_number=904,
        sop_instance_uid=UIDS.uid("legacy"),
        instance_number=1,
    )


#: The top-level sequences the repair kept before it read the standard's tables: a copy
#: repaired that way lost its functional groups and dimension sequences.
OLD_KEPT_SEQUENCES = {
    "SourceImageSequence",
    "ReferencedImageSequence",
    "AcquisitionContextSequence",
}


def test_enhanced_copy_without_functional_groups_fails_the_gate(tmp_path: Path) -> None:
    ds = legacy_enhanced_ct()
    assert check_file(write(ds, tmp_path / "intact"), source_sop_uids=SOURCE_UIDS) == []
    for elem in list(ds):
        if elem.VR == "SQ" and elem.keyword not in OLD_KEPT_SEQUENCES:
            del ds[elem.tag]
    problems = check_file(write(ds, tmp_path / "stripped"), source_sop_uids=SOURCE_UIDS)
    fg_module = "module legacy-converted-enhanced-ct-image-multi-frame-functional-groups"
    assert has(problems, "SharedFunctionalGroupsSequence missing", "Type 1", fg_module)
    # the copy lost its Dimension Organization too: Type 1 only where the Multi-frame
    # Dimension Module is mandatory (Enhanced CT, see tests/test_standard_corpus.py)


def test_required_attribute_inside_a_functional_group_is_checked(tmp_path: Path) -> None:
    """Frame Type is Type 1 in the CT Image Frame Type macro (PS3.3 C.8.15.3.1)."""
    ds = legacy_enhanced_ct()
    ds.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType = None
    problems = check_file(write(ds, tmp_path), source_sop_uids=SOURCE_UIDS)
    where = "SharedFunctionalGroupsSequence[1] > CTImageFrameTypeSequence[1] > "
    assert has(problems, where + "FrameType is empty", "Type 1"), problems


def test_sop_class_without_an_iod_is_reported(tmp_path: Path) -> None:
    ds = derived_ct()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    problems = check_file(write(ds, tmp_path), source_sop_uids=SOURCE_UIDS)
    assert has(problems, "1.2.840.10008.5.1.4.1.1.6", "not a storage SOP class")


def test_iod_specific_type1_is_required(tmp_path: Path) -> None:
    """Rescale Slope is Type 1 in the CT Image Module (PS3.3 C.8.2.1): a module the old,
    hand-typed lists did not know."""
    ds = derived_ct()
    del ds.RescaleSlope
    problems = check_file(write(ds, tmp_path), source_sop_uids=SOURCE_UIDS)
    assert has(problems, "RescaleSlope missing", "Type 1", "module ct-image of IOD ct-image")


# -- the gate in memory (the pipeline's path): the same outcome as reading the file back --


def _invalid_pn(ds: Dataset) -> None:
    set_unchecked(ds, "PatientName", "Confidential" * 10)


def _repeated_invalid_uid(ds: Dataset) -> None:
    ds.SourceImageSequence.append(copy.deepcopy(ds.SourceImageSequence[0]))
    for item in ds.SourceImageSequence:
        set_unchecked(item, "ReferencedSOPClassUID", "1.02.3")


def _no_iod(ds: Dataset) -> None:
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID


def _no_rescale_slope(ds: Dataset) -> None:
    del ds.RescaleSlope


def _sr_root_not_container(ds: Dataset) -> None:
    ds.ValueType = "TEXT"


def _stripped_functional_groups(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.VR == "SQ" and elem.keyword not in OLD_KEPT_SEQUENCES:
            del ds[elem.tag]


BREAKAGES: dict[str, Callable[[Dataset], None]] = {
    f.__name__.strip("_"): f
    for f in (
        _drop_study_uid,
        _long_uid,
        _leading_zero_in_sequence,
        _unknown_source,
        _short_pixels,
        _source_uid_reused,
        _empty_type1,
        _no_type2,
        _no_rows,
        _invalid_pn,
        _repeated_invalid_uid,
        _no_iod,
        _no_rescale_slope,
    )
}

IN_MEMORY_CASES: list[tuple[Callable[[], Dataset], Callable[[Dataset], None] | None]] = [
    *((builder, None) for builder in BUILDERS.values()),
    (legacy_enhanced_ct, None),
    (legacy_enhanced_ct, _stripped_functional_groups),
    (measurement_sr, _sr_root_not_container),
    *((derived_ct, breakage) for breakage in BREAKAGES.values()),
]


@pytest.mark.parametrize(
    ("build", "breakage"),
    IN_MEMORY_CASES,
    ids=[f"{b.__name__}-{k.__name__.strip('_') if k else 'intact'}" for b, k in IN_MEMORY_CASES],
)
def test_in_memory_gate_finds_what_reading_back_finds(
    build: Callable[[], Dataset], breakage: Callable[[Dataset], None] | None, tmp_path: Path
) -> None:
    """check_dataset on the data set and its bytes lists exactly the problems check_file
    lists for the file those bytes were written to (intact objects: none)."""
    ds = build()
    if breakage is not None:
        breakage(ds)
    data = encode_dataset(ds)
    path = tmp_path / "out.dcm"
    write_encoded(data, path)
    assert path.read_bytes() == data
    for sources in (SOURCE_UIDS, set()):  # set(): every reference is unknown
        from_file = check_file(path, source_sop_uids=sources)
        in_memory = check_dataset(ds, data, name=path.name, source_sop_uids=sources)
        assert in_memory == from_file
    assert (check_file(path, source_sop_uids=SOURCE_UIDS) == []) is (breakage is None)


def test_in_memory_gate_checks_the_bytes_themselves() -> None:
    """The encoding is checked on the bytes: truncated bytes, or File Meta Information
    that does not match the data set, fail although the data set itself is sound."""
    ds = derived_ct()
    data = encode_dataset(ds)
    assert check_dataset(ds, data, name="ct", source_sop_uids=SOURCE_UIDS) == []
    cut = check_dataset(ds, data[: len(data) // 2], name="ct", source_sop_uids=SOURCE_UIDS)
    assert has(cut, "file is truncated"), cut
    ds.file_meta.MediaStorageSOPInstanceUID = UIDS.uid("other")
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=False)  # enforce_file_format repairs the meta
    problems = check_dataset(ds, buffer.getvalue(), name="ct", source_sop_uids=SOURCE_UIDS)
    assert has(problems, "MediaStorageSOPInstanceUID", "differs from SOPInstanceUID")


def test_in_memory_gate_reports_duplicates_across_a_run(tmp_path: Path) -> None:
    ds = derived_ct()
    data = encode_dataset(ds)
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    findings = check_datasets([(first, ds, data), (second, ds, data)], source_sop_uids=SOURCE_UIDS)
    assert [(f.path, "used by another output object" in f.message) for f in findings] == [
        (second, True)
    ]
