"""DICOM results of the chest X-ray model: a TID 1500 SR and a summary Secondary Capture.

Both are new series in the source study, with UIDs from the run's :class:`UidFactory`.
The SR (PS3.16 TID 1500 Measurement Report) holds one measurement group per radiograph:
for each finding a NUM score and a present/absent evaluation at the model's operating
threshold. The summary image (PS3.3 A.8.1 Secondary Capture) is the radiograph with a
band added below it holding the findings table: the radiograph itself is not drawn on.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import cv2
import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from service.models import hdcache
from service.models.derived import mark_lossy
from service.uids import UidFactory

if TYPE_CHECKING:
    from service.models.base import RunContext
    from service.models.cxr import CxrModel, Radiograph

logger = logging.getLogger(__name__)

MANUFACTURER = "DICOM AI Gateway"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
DISCLAIMER = "AI result - not for diagnostic use"
#: Score of torchxrayvision's op_norm output at the operating threshold.
THRESHOLD = 0.5
TOP_N = 8
DISPLAY_WIDTH = 1024

#: Local coding scheme for findings without a SNOMED CT concept we could verify
#: (PS3.16 §8.2: private schemes start with "99"), declared in the Coding Scheme
#: Identification Sequence (PS3.3 C.12.1.1.4).
LOCAL_SCHEME = "99GWAI"
LOCAL_SCHEME_NAME = "DICOM AI Gateway chest X-ray findings"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"  # PS3.4 B.5


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, LOCAL_SCHEME, meaning)


#: torchxrayvision label -> concept. SNOMED CT ids only where verified (several from
#: pydicom's PS3.16 code dictionary); the rest use the documented local scheme.
FINDING_CODES: dict[str, CodedConcept] = {
    "Atelectasis": _sct("46621007", "Atelectasis"),
    "Consolidation": _local("consolidation", "Consolidation"),
    "Infiltration": _local("infiltration", "Infiltration"),
    "Pneumothorax": _sct("36118008", "Pneumothorax"),
    "Edema": _sct("19242006", "Pulmonary edema"),
    "Emphysema": _sct("87433001", "Pulmonary emphysema"),
    "Fibrosis": _sct("112674009", "Fibrosis"),
    "Effusion": _sct("60046008", "Pleural effusion"),
    "Pneumonia": _sct("233604007", "Pneumonia"),
    "Pleural_Thickening": _local("pleural-thick", "Pleural thickening"),
    "Cardiomegaly": _sct("8186001", "Cardiomegaly"),
    "Nodule": _sct("27925004", "Nodule"),
    "Mass": _sct("4147007", "Mass"),
    "Hernia": _local("hernia", "Hernia"),
    "Lung Lesion": _local("lung-lesion", "Lung lesion"),
    "Fracture": _sct("125605004", "Fracture of bone"),
    "Lung Opacity": _local("lung-opacity", "Lung opacity"),
    "Enlarged Cardiomediastinum": _local("enl-cardiomed", "Enlarged cardiomediastinum"),
}

UNIT = CodedConcept("1", "UCUM", "no units")
PRESENT = CodedConcept.from_code(codes.SCT.Present)
ABSENT = CodedConcept.from_code(codes.SCT.Absent)


@contextmanager
def _no_name_warnings() -> Iterator[None]:
    """highdicom warns with the patient's name in the text; never let it reach a log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name", category=UserWarning)
        yield


def build_outputs(
    model: CxrModel, results: Sequence[tuple[Radiograph, dict[str, float]]], ctx: RunContext
) -> list[Dataset]:
    """The SR for all ``results`` and one summary image per radiograph."""
    with _no_name_warnings():
        datasets: list[Dataset] = [build_sr(model, results, ctx.uids)]
        for number, (radiograph, scores) in enumerate(results, start=1):
            datasets.append(build_summary_image(model, radiograph, scores, ctx.uids, number))
    return datasets


hdcache.install()


def warm_up() -> None:
    """Build one throwaway highdicom object (never written): highdicom loads its tables of
    the standard (about 0.5 s of JSON) once per process, at start rather than in a run."""
    hd.SOPClass(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        series_number=1,
        sop_instance_uid="1.2.3.1.1",
        sop_class_uid=COMPREHENSIVE_3D_SR,
        instance_number=1,
        modality="SR",
    )


def algorithm_id(model: CxrModel) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[
            f"torchxrayvision weights {model.weights_path.name}",
            f"weights sha256 {model.sha256}",
            f"score {THRESHOLD} = torchxrayvision operating threshold (op_threshs)",
        ],
    )


def _coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = LOCAL_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


#: Type 2 attributes highdicom copies from the first evidence object (PS3.3 C.7.1.1, C.7.2.1).
_TYPE2_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def evidence(source: Dataset) -> Dataset:
    """The header of ``source`` without pixel data; missing Type 2 attributes empty."""
    header = Dataset()
    for element in source:
        if element.keyword != "PixelData":
            header.add(element)
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, None)
    age = str(header.get("PatientAge", "") or "")
    if age and not re.fullmatch(r"\d{3}[DWMY]", age):  # AS VR, PS3.5 §6.2
        del header.PatientAge  # an invalid value is not copied into our objects
    return header


def library_entry(source: Dataset) -> Dataset:
    """What highdicom's TID 1600 Image Library entry of ``source`` is built from: its UIDs
    and size, and the TID 1602 projection radiography descriptors (Patient Orientation,
    Imager Pixel Spacing) when the source has both. Without them the entry has the
    modality (from the SOP class), rows and columns only, rather than no library."""
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in source:
            setattr(entry, keyword, source[keyword].value)
    orientation = [str(v) for v in source.get("PatientOrientation", []) or []]
    spacing = list(source.get("ImagerPixelSpacing", []) or [])
    entry.Modality = ""
    if len(orientation) == 2 and all(orientation) and len(spacing) == 2:
        entry.Modality = source.Modality
        entry.PatientOrientation = orientation
        entry.ImagerPixelSpacing = spacing
    return entry


def build_sr(
    model: CxrModel,
    results: Sequence[tuple[Radiograph, dict[str, float]]],
    uids: UidFactory,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report with one group per radiograph (PS3.16 TID 1501)."""
    algorithm = algorithm_id(model)
    groups = []
    for radiograph, scores in results:
        source = radiograph.dataset
        sop_uid = str(source.SOPInstanceUID)
        measurements = []
        evaluations = []
        for finding, score in scores.items():
            concept = FINDING_CODES[finding]
            measurements.append(hd.sr.Measurement(name=concept, value=score, unit=UNIT))
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=concept,
                    value=PRESENT if score >= THRESHOLD else ABSENT,
                )
            )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.uid("sr", "tracking", sop_uid),
                    identifier=f"chest X-ray findings {source.get('InstanceNumber', '')}".strip(),
                ),
                algorithm_id=algorithm,
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), sop_uid)
                ],
                measurements=measurements,
                qualitative_evaluations=evaluations,
            )
        )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=UidFactory(uids.root, "device", model.name).uid(),
        name=model.name,
        manufacturer_name=MANUFACTURER,
        model_name=model.version,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        referenced_images=[library_entry(r.dataset) for r, _ in results],
    )
    root = report[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence(r.dataset) for r, _ in results],
        content=_root_without_items(root),
        series_instance_uid=uids.uid("series", "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI {model.name} findings",
    )
    sr["ContentSequence"] = root["ContentSequence"]  # as highdicom copies it from content
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_identification()]
    separate_containers(sr)
    return sr


def _root_without_items(root: Dataset) -> Dataset:
    """The report's root CONTAINER without its items, for highdicom's SR constructor.

    Given the whole tree, the constructor copies it (``deepcopy``), parses the copy back
    into content items and searches it twice for image references, only to keep a parsed
    view that we never use and to check that every referenced image is in ``evidence``:
    about 70 % of building the SR (``bench/cxr.py``). The items are then set as the
    constructor sets them (the same elements); the references it would have checked are
    the images of ``results``, which are the evidence by construction, and the
    conformance gate checks every reference of the object written."""
    stub = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            stub.add(element)
    stub.ContentSequence = []  # searched for references, then replaced
    return stub


def separate_containers(item: Dataset) -> None:
    """Every CONTAINER's items as separate statements (Continuity Of Content SEPARATE,
    PS3.3 C.18.8.1.1): viewers then show each item with its concept name, e.g.
    "Pleural effusion = 0.12"; CONTINUOUS (highdicom's default) tells them to run the
    values together as one text, without the names."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        separate_containers(child)


def display_image(image: np.ndarray) -> np.ndarray:
    """The [-1024, 1024] image as 8-bit MONOCHROME2, 1024 wide, 1st-99th percentile window.

    The image is resized first (area averaging when shrinking), so the window is computed
    on the 1024-wide image: a large radiograph costs a resize, not a full-size percentile.
    """
    rows, cols = image.shape
    size = (DISPLAY_WIDTH, max(1, round(rows * DISPLAY_WIDTH / cols)))
    interpolation = cv2.INTER_AREA if cols > DISPLAY_WIDTH else cv2.INTER_LINEAR
    small = cv2.resize(np.asarray(image, dtype=np.float32), size, interpolation=interpolation)
    low, high = np.percentile(small, (1, 99))
    scaled = small.astype(np.float64)  # one buffer, the same float64 steps in place
    scaled -= low
    scaled /= max(float(high - low), 1e-6)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= 255.0
    return scaled.astype(np.uint8)


FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.8
FONT_THICKNESS = 2
MARGIN = 12


def _text_width(text: str) -> int:
    return int(cv2.getTextSize(text, FONT, FONT_SCALE, FONT_THICKNESS)[0][0])


def with_text_band(pixels: np.ndarray, rows: Sequence[tuple[str, str]]) -> np.ndarray:
    """``pixels`` above a black band holding a two-column table in white: the text is
    added below the radiograph, never drawn over it (its pixels are kept unchanged)."""
    width = pixels.shape[1]
    line_h = int(cv2.getTextSize("Ag", FONT, FONT_SCALE, FONT_THICKNESS)[0][1]) + 14
    band = np.zeros((line_h * len(rows) + 2 * MARGIN, width), dtype=pixels.dtype)
    column = max(_text_width(left) for left, right in rows if right) + 30
    for index, (left, right) in enumerate(rows):
        y = MARGIN + line_h * (index + 1) - 7
        cv2.putText(band, left, (MARGIN, y), FONT, FONT_SCALE, 255, FONT_THICKNESS, cv2.LINE_AA)
        if right:
            cv2.putText(
                band,
                right,
                (MARGIN + column, y),
                FONT,
                FONT_SCALE,
                255,
                FONT_THICKNESS,
                cv2.LINE_AA,
            )
    return np.concatenate([pixels, band], axis=0)


def finding_name(finding: str) -> str:
    """The finding's name as the SR gives it (its concept's meaning)."""
    return str(FINDING_CODES[finding].meaning)


def table_rows(model: CxrModel, scores: dict[str, float]) -> list[tuple[str, str]]:
    """The disclaimer, the model, then the top findings (SR names) with their scores."""
    top = sorted(scores.items(), key=lambda item: item[1], reverse=True)[:TOP_N]
    rows = [(DISCLAIMER, ""), (f"{model.name} {model.version}", ""), ("finding", "score")]
    for finding, score in top:
        mark = "  positive" if score >= THRESHOLD else ""
        rows.append((finding_name(finding), f"{score:.3f}{mark}"))
    return rows


def build_summary_image(
    model: CxrModel,
    radiograph: Radiograph,
    scores: dict[str, float],
    uids: UidFactory,
    instance_number: int,
) -> hd.sc.SCImage:
    """A Secondary Capture of the radiograph above a band with the findings (PS3.3 A.8.1)."""
    source = radiograph.dataset
    sop_uid = str(source.SOPInstanceUID)
    pixels = with_text_band(radiograph.display, table_rows(model, scores))
    orientation = [str(v) for v in source.get("PatientOrientation", []) or []]
    known = len(orientation) == 2 and all(orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.uid("series", "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.uid("sc", sop_uid),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=(orientation[0], orientation[1]) if known else ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=f"AI {model.name} summary",
    )
    if not known:
        sc["PatientOrientation"].value = ""  # Type 2C, unknown in the source (PS3.3 C.7.6.1)
    # The model reads chest radiographs only (PS3.16 Annex L: CHEST). Laterality is Type 2C,
    # for paired body parts (PS3.3 C.7.3.1): the chest is not one, so it is absent unless the
    # source states one.
    sc.BodyPartExamined = "CHEST"
    laterality = str(source.get("Laterality", "") or "").strip()
    if laterality:
        sc.Laterality = laterality
    elif "Laterality" in sc:
        del sc.Laterality
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    mark_lossy(sc, radiograph.lossy)  # never "00" when derived from lossy pixels
    sc.DerivationDescription = f"{DISCLAIMER}; {model.name} {model.version}"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = sop_uid
    sc.SourceImageSequence = [reference]
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = [reference]
    sc.ReferencedSeriesSequence = [series]
    return sc
