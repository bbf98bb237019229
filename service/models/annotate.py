"""The ``annotate`` model: a derived copy of each image with a warning burned into the pixels.

Each source image becomes a new instance of the same SOP Class (same IOD) in a new series
per source series, with new UIDs from the run's :class:`~service.uids.UidFactory`, Image
Type ``DERIVED\\SECONDARY``, a Source Image Sequence naming the source, native (uncompressed)
Explicit VR Little Endian pixel data and ``Burned In Annotation`` = ``YES`` (PS3.3 C.7.6.1).
Patient, study and frame-of-reference attributes are kept, so the result joins the same study.

Enhanced multi-frame IODs (functional groups, PS3.3 C.7.6.16) are annotated only where the
copy has been verified valid (:data:`ENHANCED_IODS`): there Image Type and every Frame Type
get value 1 ``DERIVED`` and keep value 2 (``PRIMARY``: the only value the Enhanced CT Image
Module allows, PS3.3 C.8.15.2, C.8.16.1), and Burned In Annotation keeps the source's value
(the IOD allows only ``NO``; the burned-in warning identifies neither the patient nor the
date, which is what the attribute declares, PS3.3 C.7.6.1). Other Enhanced IODs are refused
with the reason, as are SOP classes that are not in the standard's tables.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ExplicitVRLittleEndian,
)

from service.dicomrules import iod_of, uses_functional_groups
from service.errors import InputError, ModelError, TransientError
from service.models.base import Applicability, ModelResult, RunContext, nothing_produced
from service.models.derived import lossy_history, mark_lossy
from service.models.dicomio import read_dicom
from service.models.pixels import undecodable_reason
from service.models.repair import repair_copied_attributes
from service.values import Instance, Study

logger = logging.getLogger(__name__)

TEXT_LINES = ("AI PROCESSED", "NOT FOR DIAGNOSIS")
DESCRIPTION_PREFIX = "AI annotated"
SERIES_NUMBER_OFFSET = 1000
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Colour interpretations pydicom decodes to RGB (PS3.3 C.7.6.3.1.2).
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
#: Elements that no longer describe the derived object.
DROPPED = (
    "IconImageSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelDataProviderURL",
    "DataSetTrailingPadding",
)

Pixels = npt.NDArray[Any]


#: Enhanced multi-frame IODs whose annotated copies are valid (tests/test_standard_corpus.py
#: checks them with dciodvfy). Enhanced MR is not: with Image Type value 1 DERIVED, the MR
#: Pulse Sequence and Bulk Motion attributes the source carries for ORIGINAL frames are
#: reported as present when their condition is unsatisfied (PS3.3 C.8.13.4, C.7.6.18.2).
ENHANCED_IODS = frozenset({"enhanced-ct-image"})
#: The functional groups sequences of an Enhanced multi-frame image (PS3.3 C.7.6.16).
FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def unsupported_reason(ds: Dataset) -> str | None:
    """Why ``ds`` cannot be annotated, or None when it can (PS3.3 C.7.6.3 Image Pixel; the
    IOD of its SOP class, PS3.3 Annex A)."""
    if "PixelData" not in ds:
        return "no Pixel Data: not an image"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    iod = iod_of(sop_class)
    if iod is None:
        return (
            f"SOP class {sop_class[:80]!r} is not a storage SOP class of the standard "
            "(retired or private): a copy could not be checked against its IOD"
        )
    if uses_functional_groups(sop_class) and iod not in ENHANCED_IODS:
        return (
            f"Enhanced multi-frame IOD {iod} is not supported: a derived copy must mark "
            "Image Type and every Frame Type DERIVED, which changes what its functional "
            "groups require (PS3.3 C.7.6.16)"
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if not (
        (samples == 1 and photometric in MONOCHROME) or (samples == 3 and photometric in COLOUR)
    ):
        return f"unsupported Photometric Interpretation {photometric!r} ({samples} samples)"
    bits = ds.get("BitsAllocated")
    if bits not in (8, 16):
        return f"unsupported Bits Allocated {bits!r}"
    if not ds.get("Rows") or not ds.get("Columns"):
        return "no Rows/Columns"
    return undecodable_reason(ds) or None


def _frames(ds: Dataset, arr: Pixels) -> Pixels:
    """``arr`` as (frames, rows, columns[, samples])."""
    single = 2 if int(ds.SamplesPerPixel) == 1 else 3
    return arr[np.newaxis] if arr.ndim == single else arr


def _text_mask(rows: int, columns: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Masks of the warning text and of its outline, sized to the image."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    widths = [cv2.getTextSize(line, font, 1.0, 2)[0] for line in TEXT_LINES]
    line_height = max(h for _w, h in widths) * 1.6
    # Fit the widest line to 90% of the width and the block to 25% of the height.
    scale = min(
        0.9 * columns / max(w for w, _h in widths), 0.25 * rows / (len(widths) * line_height)
    )
    thickness = max(1, round(2 * scale))
    text = np.zeros((rows, columns), np.uint8)
    outline = np.zeros((rows, columns), np.uint8)
    x = max(1, round(0.03 * columns))
    y = max(1, round(0.03 * rows))
    for line in TEXT_LINES:
        y += round(line_height * scale)
        cv2.putText(outline, line, (x, y), font, scale, 255, thickness + 2, cv2.LINE_8)
        cv2.putText(text, line, (x, y), font, scale, 255, thickness, cv2.LINE_8)
    return text > 0, (outline > 0) & (text == 0)


def burn_in(ds: Dataset, frames: Pixels) -> Pixels:
    """Burn the warning into each frame of stored values, bright on a dark outline.

    Grey levels are the frame's own extremes (so any window shows them and the stored range
    is respected); MONOCHROME1 displays low values bright (PS3.3 C.7.6.3.1.2).
    """
    out = frames.copy()
    text, outline = _text_mask(out.shape[1], out.shape[2])
    invert = str(ds.PhotometricInterpretation) == "MONOCHROME1"
    for frame in out:
        if frame.ndim == 3:  # RGB: full-scale white on black
            high: Any = (1 << int(ds.BitsStored)) - 1
            low: Any = 0
        else:
            low, high = frame.min(), frame.max()
            if invert:
                low, high = high, low
        frame[outline] = low
        frame[text] = high
    return out


#: SOP classes whose IOD requires the Frame of Reference module (PS3.3 A.3 CT, A.4 MR).
FRAME_OF_REFERENCE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"})


def _mark_enhanced_derived(ds: Dataset) -> None:
    """Value 1 ``DERIVED`` in Image Type and in the Frame Type of every functional group;
    value 2 and the rest kept (PS3.3 C.8.16.1: Image Type value 1 is DERIVED when every
    frame's is; value 2 of an Enhanced CT/MR image is PRIMARY). Burned In Annotation is
    left as the source has it (see the module's docstring)."""
    ds.ImageType = ["DERIVED", *list(ds.get("ImageType", []) or ["PRIMARY"])[1:]]
    for keyword in FUNCTIONAL_GROUPS:
        for group in ds.get(keyword, []):
            for elem in group:
                if elem.VR != "SQ":
                    continue
                for item in elem.value:
                    if item.get("FrameType"):
                        item.FrameType = ["DERIVED", *list(item.FrameType)[1:]]


def derive(source: Dataset, ctx: RunContext, now: datetime) -> Dataset:
    """The annotated derived copy of ``source`` (which is modified in place and returned)."""
    ds = source
    frames = burn_in(ds, _frames(ds, ds.pixel_array))
    mark_lossy(ds, lossy_history(ds))  # PS3.3 C.7.6.1.1.5, before the pixels are replaced
    src_class, src_sop = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    src_series = str(ds.SeriesInstanceUID)

    ds.remove_private_tags()
    for keyword in DROPPED:
        if keyword in ds:
            del ds[keyword]
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    photometric = "RGB" if int(ds.SamplesPerPixel) == 3 else str(ds.PhotometricInterpretation)
    multi = "NumberOfFrames" in ds or frames.shape[0] > 1
    ds.set_pixel_data(
        frames if multi else frames[0],
        photometric,
        int(ds.BitsStored),
        generate_instance_uid=False,
    )

    ds.SOPInstanceUID = ctx.uids.uid("instance", "annotate", src_sop)
    ds.SeriesInstanceUID = ctx.uids.uid("series", "annotate", src_series)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    number = str(ds.get("SeriesNumber", "") or "").strip()
    if number.lstrip("-").isdigit() and abs(int(number)) < 2**31 - SERIES_NUMBER_OFFSET:
        ds.SeriesNumber = int(number) + SERIES_NUMBER_OFFSET
    description = str(ds.get("SeriesDescription", "") or "").strip()
    ds.SeriesDescription = (
        f"{DESCRIPTION_PREFIX}: {description}" if description else DESCRIPTION_PREFIX
    )[:64]
    if uses_functional_groups(src_class):
        _mark_enhanced_derived(ds)
    else:
        ds.ImageType = ["DERIVED", "SECONDARY", *list(ds.get("ImageType", []))[2:]]
        ds.BurnedInAnnotation = "YES"
    ds.DerivationDescription = (
        f"Text '{' - '.join(TEXT_LINES)}' burned into the pixel data by annotate "
        f"{AnnotateModel.version}"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = src_class
    reference.ReferencedSOPInstanceUID = src_sop
    reference.PurposeOfReferenceCodeSequence = [
        CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    ds.SourceImageSequence = [reference]
    if "FrameOfReferenceUID" not in ds and src_class in FRAME_OF_REFERENCE_CLASSES:
        # Type 1 (PS3.3 C.7.4.1); the source has none, so no spatial relation is broken
        ds.FrameOfReferenceUID = ctx.uids.uid("frame-of-reference", "annotate", src_series)
    repaired = repair_copied_attributes(ds)
    if repaired:
        logger.debug(
            "sop=%s repaired copied attributes: %s", ds.SOPInstanceUID, ", ".join(repaired)
        )
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for prefix in ("Series", "Content"):
        if f"{prefix}Date" in ds:
            ds[f"{prefix}Date"].value = date
        if f"{prefix}Time" in ds:
            ds[f"{prefix}Time"].value = time
    return ds


def _read(path: Path, defer_size: int | None = None) -> Dataset:
    try:
        return read_dicom(path, defer_size=defer_size)
    except InputError as exc:
        raise ModelError(f"cannot read {path.name}: {exc}") from exc


class AnnotateModel:
    """Burns ``AI PROCESSED - NOT FOR DIAGNOSIS`` into a derived copy of every image."""

    name = "annotate"
    version = "1.0.0"

    def ready(self) -> Applicability:
        return Applicability(True)

    def _check(self, instances: Iterable[Instance]) -> tuple[list[Instance], dict[str, str]]:
        usable: list[Instance] = []
        skipped: dict[str, str] = {}
        for inst in instances:
            try:
                reason = unsupported_reason(_read(inst.path, defer_size=4096))
            except ModelError as exc:
                reason = str(exc)
            if reason is None:
                usable.append(inst)
            else:
                skipped[inst.sop_instance_uid] = reason
        return usable, skipped

    def applies(self, study: Study) -> Applicability:
        usable, skipped = self._check(study.instances)
        if usable:
            return Applicability(True)
        reasons = sorted(set(skipped.values())) or ["no instances"]
        return Applicability(False, "no image with supported pixel data: " + "; ".join(reasons))

    def run(self, study: Study, ctx: RunContext) -> ModelResult:
        result = self.run_part(study, ctx)
        if not result.datasets:
            raise ModelError(nothing_produced(self.name, result.skipped_instances))
        return result

    def run_part(self, study: Study, ctx: RunContext) -> ModelResult:
        usable, skipped = self._check(study.instances)
        now = ctx.started or datetime.now()
        datasets: list[Dataset] = []
        series: list[str] = []
        for inst in sorted(usable, key=lambda i: (i.series_instance_uid, i.sop_instance_uid)):
            try:
                ds = derive(_read(inst.path), ctx, now)
            except (ModelError, TransientError):  # a mount away is not this instance's fault
                raise
            except OSError as exc:
                raise TransientError(f"cannot read {inst.path.name}: {exc}") from exc
            except Exception as exc:  # pixel decoding or encoding of this instance failed
                skipped[inst.sop_instance_uid] = f"cannot annotate: {type(exc).__name__}: {exc}"
                logger.warning("annotate skipped %s: %s", inst.sop_instance_uid, exc)
                continue
            datasets.append(ds)
            if ds.SeriesInstanceUID not in series:
                series.append(str(ds.SeriesInstanceUID))
        logger.info(
            "annotate: study %s, %d instance(s) in %d new series, %d skipped",
            study.study_uid,
            len(datasets),
            len(series),
            len(skipped),
        )
        return ModelResult(
            datasets=datasets,
            findings={"instances": len(datasets), "series": series},
            skipped_instances=skipped,
        )

    def merge_findings(self, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        series = [uid for part in parts for uid in part.get("series", [])]
        return {
            "instances": sum(int(part.get("instances", 0)) for part in parts),
            "series": list(dict.fromkeys(series)),
        }
