"""Pixel data decoding for the models: every encapsulated transfer syntax pydicom names a
decoder for (PS3.5 A.4) decodes with a permissively licensed decoder, or is refused with
its name.

pydicom's plugins for JPEG Extended (Process 2 & 4, 1.2.840.10008.1.2.4.51, PS3.5 A.4.1)
are python-gdcm and Pillow, and both refuse 12-bit samples (pydicom's gdcm plugin refuses
them before asking GDCM; Pillow's libjpeg is 8-bit only), so a 12-bit JPEG Extended image
decoded with nothing installed here. GDCM itself decodes them (its IJG build has 8, 12 and
16-bit codecs): this module is a pydicom decoder plugin (pydicom's "Decoder plugins" guide:
``is_available``, ``DECODER_DEPENDENCIES`` and a frame function) that hands such frames to
GDCM, added after pydicom's own plugins by :func:`register`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.uid import UID, JPEGExtended12Bit

from service.errors import InputError

logger = logging.getLogger(__name__)

PLUGIN = "gdcm-12bit"
#: pydicom's plugin contract: the syntaxes this plugin decodes and what it needs.
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("gdcm>=3.0.10",)}

try:
    import gdcm

    HAVE_GDCM = True
except ImportError:  # pragma: no cover - python-gdcm is a pinned dependency
    HAVE_GDCM = False


def is_available(uid: str) -> bool:
    """Whether this plugin can decode ``uid`` (pydicom's plugin contract)."""
    return HAVE_GDCM and uid in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One JPEG Extended frame of 9 to 12-bit samples decoded by GDCM (PS3.5 A.4.1): the
    8-bit case is left to pydicom's own plugins, which decode it."""
    precision = int(runner.bits_stored)
    if precision <= 8:
        raise ValueError("8-bit JPEG Extended is decoded by the gdcm and pillow plugins")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEGExtended12Bit)))
    # 12-bit precision in 16-bit containers, whatever Bits Stored the header gives
    image.SetPixelFormat(
        gdcm.PixelFormat(runner.samples_per_pixel, 16, 12, 11, runner.pixel_representation)
    )
    runner.set_option("bits_allocated", 16)
    buffer: Any = image.GetBuffer()
    if not buffer:
        raise ValueError("GDCM could not decode the JPEG Extended frame")
    expected = runner.rows * runner.columns * runner.samples_per_pixel * 2
    frame = bytes(buffer.encode("utf-8", "surrogateescape"))  # GDCM returns char* as str
    if len(frame) != expected:
        raise ValueError(f"GDCM decoded {len(frame)} bytes, {expected} expected")
    return frame


def register() -> None:
    """Add :func:`decode_frame` as the last JPEG Extended plugin of pydicom (once)."""
    decoder = get_decoder(JPEGExtended12Bit)
    if PLUGIN not in decoder.available_plugins and is_available(JPEGExtended12Bit):
        decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))


def transfer_syntax(ds: Dataset) -> UID:
    """The Transfer Syntax UID of ``ds`` (:func:`read_dicom` always records one)."""
    meta = getattr(ds, "file_meta", None) or Dataset()
    return UID(str(meta.get("TransferSyntaxUID", "") or ""))


def undecodable_reason(ds: Dataset) -> str:
    """Why the pixel data of ``ds`` cannot be decoded here, from its transfer syntax alone
    ("" when a decoder is available): an encapsulated syntax (PS3.5 A.4) without one,
    such as MPEG-2, H.264 or HEVC video, or a syntax this pydicom does not know."""
    syntax = transfer_syntax(ds)
    if not syntax or not syntax.is_transfer_syntax:
        return f"cannot decode unknown transfer syntax {syntax or '(none)'}"
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    return "" if available else f"cannot decode {syntax.name}: no decoder for it is installed"


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The stored pixel values of ``ds``; :class:`InputError` names the syntax when every
    decoder fails or none applies."""
    reason = undecodable_reason(ds)
    if reason:
        raise InputError(reason)
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        raise InputError(
            f"cannot decode {transfer_syntax(ds).name}: {type(exc).__name__}: {exc}"
        ) from exc
