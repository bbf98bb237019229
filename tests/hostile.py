"""Generated hostile DICOM files: real files with a structure spliced in that a parser
walks recursively or element by element (Explicit VR Little Endian, PS3.5 §7.1.2, §7.5)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

#: Content Sequence (0040,A730): a standard SQ that sorts after the UIDs and before pixels.
_SEQUENCE_TAG = (0x0040, 0xA730)
_UNDEFINED = 0xFFFFFFFF


def _item(body: bytes, undefined: bool) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, _UNDEFINED) + body + _ITEM_END
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


_ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQ_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def _sequence(items: bytes, undefined: bool) -> bytes:
    group, elem = _SEQUENCE_TAG
    length = _UNDEFINED if undefined else len(items)
    return (
        struct.pack("<HH2sHL", group, elem, b"SQ", 0, length)
        + items
        + (_SEQ_END if undefined else b"")
    )


def nested_sequences(depth: int, undefined: bool = False) -> bytes:
    """A Content Sequence holding one item holding a Content Sequence … ``depth`` deep."""
    inner = b""
    for _ in range(depth):
        inner = _sequence(_item(inner, undefined), undefined)
    return inner


def many_items(count: int) -> bytes:
    """A Content Sequence of ``count`` items of one short element each (2 elements each)."""
    code_value = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"1 "
    return _sequence(_item(code_value, False) * count, False)


def splice(source: Path, target: Path, element: bytes) -> Path:
    """``source`` (a file with native pixel data) rewritten as Explicit VR Little Endian
    with ``element`` (a Content Sequence) inserted before its Pixel Data; private and
    later elements are left out so that the tags stay in order."""
    ds = dcmread(source)
    pixels = ds.PixelData
    vr = ds["PixelData"].VR
    for tag in [e.tag for e in ds if e.tag >= 0x0040A730 or e.tag.is_private]:
        del ds[tag]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    if len(pixels) % 2:
        pixels += b"\0"
    pixel_element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, vr.encode(), 0, len(pixels))
    target.write_bytes(buffer.getvalue() + element + pixel_element + pixels)
    return target
