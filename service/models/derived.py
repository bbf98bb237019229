"""What every image the models derive from a source image inherits: its lossy compression.

PS3.3 C.7.6.1.1.5: once pixel data has been lossy compressed, Lossy Image Compression
(0028,2110) is "01" in it and in every image derived from it, and shall never be reset
to "00"; Lossy Image Compression Method (0028,2114) and Ratio (0028,2112) list each
successive lossy step, in order, with the same number of values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from highdicom.frame import get_lossy_compression_attributes
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

from service.models.pixels import transfer_syntax

logger = logging.getLogger(__name__)

#: JPEG Extended (Process 2 & 4) is lossy JPEG, as JPEG Baseline (PS3.5 A.4.1); its method
#: is ISO_10918_1 (PS3.3 C.7.6.1.1.5.1). highdicom's table of lossy syntaxes omits it.
JPEG_LOSSY = get_lossy_compression_attributes(JPEGBaseline8Bit)[1]


def lossy_method(syntax: str) -> str | None:
    """The Lossy Image Compression Method of a transfer syntax, None when lossless."""
    if syntax == JPEGExtended12Bit:
        return JPEG_LOSSY
    flag, method = get_lossy_compression_attributes(syntax)
    return method if flag == "01" else None


@dataclass(frozen=True)
class LossyHistory:
    """The lossy compression steps a source image's pixels went through."""

    methods: tuple[str, ...] = ()
    ratios: tuple[str, ...] = ()


def lossy_history(ds: Dataset) -> LossyHistory | None:
    """The lossy history of ``ds`` (with its Pixel Data, for the ratio of its own encoding),
    from its Lossy Image Compression attributes and its transfer syntax; None when its
    pixels were never lossy compressed. The encoding in a lossy transfer syntax counts as
    a step unless the last recorded method already is that syntax's (the encoder recorded
    it, as dcmtk and GDCM do)."""
    flag = str(ds.get("LossyImageCompression", "") or "").strip()
    methods = [str(v) for v in _values(ds, "LossyImageCompressionMethod")]
    ratios = [str(v) for v in _values(ds, "LossyImageCompressionRatio")]
    method = lossy_method(str(transfer_syntax(ds)))
    if method and (not methods or methods[-1] != method):
        methods.append(method)
        ratio = _ratio(ds)
        if ratio and len(ratios) == len(methods) - 1:
            ratios.append(ratio)
    if flag != "01" and not method and not methods:
        return None
    if len(ratios) != len(methods):
        ratios = []  # Type 3; without a value per method it would contradict them
    return LossyHistory(tuple(methods), tuple(ratios))


def mark_lossy(target: Dataset, history: LossyHistory | None) -> None:
    """Record ``history`` in a derived image (PS3.3 C.7.6.1.1.5); nothing when None."""
    if history is None:
        return
    target.LossyImageCompression = "01"
    for keyword, values in (
        ("LossyImageCompressionMethod", history.methods),
        ("LossyImageCompressionRatio", history.ratios),
    ):
        if values:
            setattr(target, keyword, list(values))
        elif keyword in target:
            del target[keyword]


def _values(ds: Dataset, keyword: str) -> list[object]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def _ratio(ds: Dataset) -> str:
    """Uncompressed over encoded size of the Pixel Data, as a DS of up to 16 characters."""
    if "PixelData" not in ds or not ds.get("Rows") or not ds.get("Columns"):
        return ""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    raw = int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8
    return f"{raw / max(1, len(ds.PixelData)):.2f}"
