"""Repairs a model applies to attributes it copies from a source into a derived object,
so that the object passes the conformance gate (the gate itself never repairs)."""

from __future__ import annotations

import logging

from pydicom import Dataset

from service.dicomrules import top_level_required, top_level_types, value_ok

logger = logging.getLogger(__name__)


def repair_copied_attributes(ds: Dataset) -> list[str]:
    """Make a dataset copied from a source pass the gate's attribute checks; list the changes.

    Attributes copied from real-world sources are often invalid (e.g. PatientAge ``'30'``
    instead of ``'030Y'``, PS3.5 §6.2) or absent (Type 2, PS3.5 §7.4). Invalid Type 2 values
    are emptied, other invalid values removed, and missing Type 2 attributes added empty.
    Type 1 attributes and UIDs are never invented: the gate reports those. The types are
    those of the mandatory modules of the object's IOD in the standard's tables (PS3.3
    Annex A and C, see :func:`service.dicomrules.requirements`).
    """
    changed = []
    sop_class = str(ds.get("SOPClassUID", "") or "")
    type2 = top_level_required(sop_class, "2")
    type1 = top_level_required(sop_class, "1")
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


#: Type 3 top-level sequences a derived copy keeps. Sequences its IOD requires or may require
#: (Type 1, 1C, 2 or 2C in one of its modules: e.g. the functional groups and the dimension
#: sequences of an Enhanced multi-frame image, PS3.3 C.7.6.16, C.7.6.17) are always kept;
#: other Type 3 sequences of the source (e.g. identification macros with missing Type 1
#: items, empty Other Patient IDs) are dropped.
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
    types = top_level_types(str(ds.get("SOPClassUID", "") or ""))
    for elem in list(ds):
        if elem.VR != "SQ" or elem.keyword in KEPT_SEQUENCES:
            continue
        if types.get(elem.keyword, frozenset()) - {"3"}:
            continue  # required, or required under a condition the copy keeps meeting
        del ds[elem.tag]
        changed.append(elem.keyword or str(elem.tag))
    # Laterality (C.7.3.1): required for paired body parts; unknown body part -> empty
    # (Image Laterality, C.7.6.2, or Frame Laterality in the Frame Anatomy functional group,
    # C.7.6.16.2.8, takes its place: then it must be absent)
    other_laterality = "ImageLaterality" in ds or "SharedFunctionalGroupsSequence" in ds
    if not ds.get("Laterality"):
        if ds.get("BodyPartExamined") or other_laterality:
            if "Laterality" in ds:
                del ds.Laterality
                changed.append("Laterality")
        elif "Laterality" not in ds:
            ds.Laterality = None
            changed.append("Laterality")
    # Patient Orientation (C.7.6.1.1.1): Type 2C, required when the IOD does not require
    # Image Orientation (Patient) and Image Position (Patient) (no mandatory Image Plane)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    planar = "ImageOrientationPatient" in top_level_required(sop_class, "1")
    if "PatientOrientation" in types and not planar and "PatientOrientation" not in ds:
        ds.PatientOrientation = None
        changed.append("PatientOrientation")
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
