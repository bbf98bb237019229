"""Repairs a model applies to attributes it copies from a source into a derived object,
so that the object passes the conformance gate (the gate itself never repairs)."""

from __future__ import annotations

import logging

from pydicom import Dataset

from service.dicomrules import REQUIRED_MODULES, kind_of, value_ok

logger = logging.getLogger(__name__)


#: Type 2 (and simple Type 2C) attributes of image IODs whose derived copies keep the source's
#: SOP class; sources often lack them (PS3.3 A.3 CT, A.4 MR, A.2 CR; C.7.3.1 Laterality,
#: C.7.6.1 General Image, C.7.6.2 Image Plane, C.7.4.1 Frame of Reference).
_IOD_TYPE2: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.5.1.4.1.1.2": (  # CT Image
        "Laterality",
        "InstanceNumber",
        "PatientOrientation",
        "PositionReferenceIndicator",
        "SliceThickness",
        "KVP",
        "AcquisitionNumber",
    ),
    "1.2.840.10008.5.1.4.1.1.4": (  # MR Image
        "Laterality",
        "InstanceNumber",
        "PatientOrientation",
        "PositionReferenceIndicator",
        "SliceThickness",
        "ScanOptions",
        "MRAcquisitionType",
        "EchoTime",
        "EchoTrainLength",
    ),
    "1.2.840.10008.5.1.4.1.1.1.1": (  # DX Image, For Presentation (A.26)
        "InstanceNumber",
        "PatientOrientation",
        "AcquisitionContextSequence",
    ),
    "1.2.840.10008.5.1.4.1.1.1.1.1": (  # DX Image, For Processing
        "InstanceNumber",
        "PatientOrientation",
        "AcquisitionContextSequence",
    ),
    "1.2.840.10008.5.1.4.1.1.1": (  # CR Image
        "Laterality",
        "InstanceNumber",
        "PatientOrientation",
        "BodyPartExamined",
        "ViewPosition",
    ),
}


def repair_copied_attributes(ds: Dataset) -> list[str]:
    """Make a dataset copied from a source pass the gate's attribute checks; list the changes.

    Attributes copied from real-world sources are often invalid (e.g. PatientAge ``'30'``
    instead of ``'030Y'``, PS3.5 §6.2) or absent (Type 2, PS3.5 §7.4). Invalid Type 2 values
    are emptied, other invalid values removed, and missing Type 2 attributes added empty.
    Type 1 attributes and UIDs are never invented: the gate reports those.
    """
    changed = []
    type2 = {k for module in REQUIRED_MODULES[kind_of(ds)] for k in module.type2}
    type2.update(_IOD_TYPE2.get(str(ds.get("SOPClassUID", "")), ()))
    type1 = {k for module in REQUIRED_MODULES[kind_of(ds)] for k in module.type1}
    for elem in list(ds):
        if elem.VR == "SQ" or elem.VR == "UI" or elem.keyword in type1 or value_ok(elem):
            continue
        if elem.keyword in type2:
            elem.value = None
        else:
            del ds[elem.tag]
        changed.append(elem.keyword or str(elem.tag))
    for keyword in sorted(type2 - set(ds.dir())):
        setattr(ds, keyword, None)
        changed.append(keyword)
    changed += _fit_conditions(ds)
    return changed


#: Top-level sequences a derived copy keeps; other Type 3 sequences of the source (e.g.
#: identification macros with missing Type 1 items, empty Other Patient IDs) are dropped.
KEPT_SEQUENCES = frozenset(
    {
        "SourceImageSequence",
        "ReferencedImageSequence",
        "DerivationCodeSequence",
        "AnatomicRegionSequence",
        "ModalityLUTSequence",
        "VOILUTSequence",
        "ReferencedStudySequence",
        "ReferencedPerformedProcedureStepSequence",
        "AcquisitionContextSequence",
    }
)
#: Scan Options (0018,0022) values that make Trigger Time required (PS3.3 C.8.3.1).
_TRIGGERED = frozenset({"CG", "PPG"})


def _fit_conditions(ds: Dataset) -> list[str]:
    """Type 2C attributes and sequences whose conditions a copied dataset may not meet."""
    changed = []
    for elem in list(ds):
        if elem.VR == "SQ" and elem.keyword not in KEPT_SEQUENCES:
            del ds[elem.tag]
            changed.append(elem.keyword or str(elem.tag))
    # Laterality (C.7.3.1): required for paired body parts; unknown body part -> empty
    if not ds.get("Laterality"):
        if ds.get("BodyPartExamined"):
            if "Laterality" in ds:
                del ds.Laterality
                changed.append("Laterality")
        elif "Laterality" not in ds:
            ds.Laterality = None
            changed.append("Laterality")
    if str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.4":  # MR Image, C.8.3.1
        if "InversionTime" in ds and "IR" not in list(ds.get("ScanningSequence", [])):
            del ds.InversionTime
            changed.append("InversionTime")
        if "TriggerTime" in ds and not _TRIGGERED & set(ds.get("ScanOptions", []) or []):
            del ds.TriggerTime
            changed.append("TriggerTime")
    spacing = ds.get("PixelSpacing")
    is_cr = str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.1"
    if is_cr and spacing is not None and any(float(v) == 0 for v in spacing or []):
        del ds.PixelSpacing  # Type 3 in CR; a zero spacing is invalid (PS3.3 10.7.1.3)
        changed.append("PixelSpacing")
    return changed
