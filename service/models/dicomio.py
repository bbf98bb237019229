"""Reading a DICOM file for a model: also streams without preamble or File Meta."""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from service.errors import InputError, TransientError
from service.models.pixels import register

register()  # the 12-bit JPEG Extended decoder, for every model that reads through here

logger = logging.getLogger(__name__)


def read_dicom(
    path: Path, stop_before_pixels: bool = False, defer_size: int | None = None
) -> Dataset:
    """Read ``path``, also a stream without preamble or File Meta (PS3.10 §7.1).

    Without a Transfer Syntax UID the one the stream was parsed with is recorded
    (implicit VR little endian, PS3.5 §10.1, for old ACR-NEMA style streams).
    """
    try:
        ds = dcmread(path, force=True, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except OSError as exc:  # the file is there but cannot be read now: may pass
        raise TransientError(f"cannot read {Path(path).name}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise InputError(f"not readable as DICOM: {type(exc).__name__}: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta = ds.file_meta or FileMetaDataset()
        if implicit is False:
            syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        else:
            syntax = ImplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax
    return ds
