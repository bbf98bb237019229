"""DICOM rules shared by the conformance gate and the models: the PS3.3 modules our
objects carry (Type 1 and Type 2 attributes) and the value checks of PS3.5 and PS3.6."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from service.uids import is_valid_uid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Module:
    """The attributes of one PS3.3 module that every object we write must carry."""

    name: str
    section: str
    type1: tuple[str, ...] = ()  # present and not empty
    type2: tuple[str, ...] = ()  # present, may be empty


# PS3.3 modules common to every object we write (derived images, SC images, SR documents).
_PATIENT = Module(
    "Patient", "C.7.1.1", type2=("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
)
_GENERAL_STUDY = Module(
    "General Study",
    "C.7.2.1",
    type1=("StudyInstanceUID",),
    type2=("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"),
)
_GENERAL_EQUIPMENT = Module("General Equipment", "C.7.5.1", type2=("Manufacturer",))
_SOP_COMMON = Module("SOP Common", "C.12.1", type1=("SOPClassUID", "SOPInstanceUID"))
_COMMON = (_PATIENT, _GENERAL_STUDY, _GENERAL_EQUIPMENT, _SOP_COMMON)

# Images: General Series and Image Pixel (Pixel Data is Type 1C, required for us).
_GENERAL_SERIES = Module(
    "General Series", "C.7.3.1", type1=("Modality", "SeriesInstanceUID"), type2=("SeriesNumber",)
)
_IMAGE_PIXEL = Module(
    "Image Pixel",
    "C.7.6.3",
    type1=(
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    ),
)
# SR documents: SR Document Series, SR Document General and SR Document Content (root item:
# Concept Name Code Sequence and Content Sequence are required for a CONTAINER).
_SR_SERIES = Module(
    "SR Document Series", "C.17.1", type1=("Modality", "SeriesInstanceUID", "SeriesNumber")
)
_SR_GENERAL = Module("SR Document General", "C.17.2", type1=("CompletionFlag", "VerificationFlag"))
_SR_CONTENT = Module(
    "SR Document Content",
    "C.17.3",
    type1=("ValueType", "ConceptNameCodeSequence", "ContentSequence"),
)

#: Required modules per kind of object.
REQUIRED_MODULES: dict[str, tuple[Module, ...]] = {
    "image": (*_COMMON, _GENERAL_SERIES, _IMAGE_PIXEL),
    "sr": (*_COMMON, _SR_SERIES, _SR_GENERAL, _SR_CONTENT),
    "other": (*_COMMON, _GENERAL_SERIES),
}

_STRING_FORM_VRS = frozenset({"IS", "DS", "PN"})
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})


def kind_of(ds: Dataset) -> str:
    """``"sr"`` for Modality SR, ``"image"`` for an object with pixel data (or Rows), else
    ``"other"``."""
    if ds.get("Modality") == "SR":
        return "sr"
    if "PixelData" in ds or "Rows" in ds:
        return "image"
    return "other"


def _values(elem: DataElement) -> list[object]:
    value = elem.value
    if isinstance(value, MultiValue | list | tuple):
        return [v for v in value if v not in (None, "")]
    return [] if value in (None, "") else [value]


def value_problems(elem: DataElement) -> list[str]:
    """The problems of one element's value: VM (PS3.6), VR (PS3.5 §6.2), UID (§9.1)."""
    name = f"{elem.keyword or 'element'} {elem.tag}"
    if not _vm_ok(elem):
        return [f"{name} has {elem.VM} values, not VM {dictionary_VM(elem.tag)} (PS3.6)"]
    problems = []
    for value in _values(elem):
        if elem.VR == "UI":
            if not is_valid_uid(value):
                problems.append(
                    f"{name} {str(value)[:80]!r} is not a valid UID (PS3.5 §9.1: at most "
                    "64 characters, digits and dots, no leading zeros)"
                )
            continue
        try:
            # IS, DS and PN values are objects here; their validators check the string
            plain = str(value) if elem.VR in _STRING_FORM_VRS else value
            validate_value(elem.VR, plain, config.RAISE)
        except ValueError:
            # the value itself may identify the patient: name the attribute only
            problems.append(f"{name} has a value not valid for VR {elem.VR} (PS3.5 §6.2)")
            break
    return problems


def _vm_ok(elem: DataElement) -> bool:
    """Value multiplicity against the data dictionary (PS3.6), e.g. "2", "1-n", "3-3n"."""
    try:
        spec = dictionary_VM(elem.tag)
    except KeyError:
        return True
    vm = elem.VM
    if vm == 0 or not spec:
        return True
    low_text, _, high_text = spec.partition("-")
    low = int(low_text)
    if not high_text:
        return vm == low
    if high_text == "n":
        return vm >= low
    if high_text.endswith("n"):  # "2-2n": a multiple of the step
        step = int(high_text[:-1])
        return vm >= low and vm % step == 0
    return low <= vm <= int(high_text)


def value_ok(elem: DataElement) -> bool:
    return elem.VR in BULK_VRS or not value_problems(elem)
