"""Where result objects go, and writing them as DICOM files (PS3.10) atomically."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from pydicom import Dataset, dcmwrite

from service.errors import OutputError, TransientError
from service.fsutil import atomic_writer, is_within, safe_name
from service.uids import is_valid_uid

logger = logging.getLogger(__name__)

LAYOUTS = ("study", "flat")


def _uid_component(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "")
    if not is_valid_uid(value) or safe_name(value) is None:
        raise OutputError(f"{keyword} {value[:80]!r} is not a valid UID (PS3.5 §9.1)")
    return value


def output_path(output_root: Path, gateway_id: str, layout: str, ds: Dataset) -> Path:
    """The file ``ds`` is written to under ``output_root``.

    ``study``: ``gateway_<id>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``;
    ``flat``: ``gateway_<id>/<SOPInstanceUID>.dcm``. Raises OutputError for anything that
    could address a path outside ``output_root``.
    """
    if safe_name(gateway_id) is None or safe_name(f"gateway_{gateway_id}") is None:
        raise OutputError(f"unusable gateway id {gateway_id[:80]!r}")
    folder = output_root / f"gateway_{gateway_id}"
    sop_uid = _uid_component(ds, "SOPInstanceUID")
    if layout == "study":
        folder = folder / _uid_component(ds, "StudyInstanceUID")
    elif layout != "flat":
        raise OutputError(f"unknown output layout {layout!r}; expected one of {LAYOUTS}")
    target = folder / f"{sop_uid}.dcm"
    if not is_within(target, output_root):
        raise OutputError(f"output path for {sop_uid} leaves the output folder")
    return target


def encode_dataset(ds: Dataset) -> bytes:
    """``ds`` encoded as a DICOM file (preamble, ``DICM``, File Meta, PS3.10 §7), in memory.

    The File Meta Information is completed from the dataset (``enforce_file_format``); its
    Transfer Syntax UID must be set. Raises OutputError when pydicom cannot encode it.
    """
    buffer = io.BytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:
        raise OutputError(
            f"cannot write {ds.get('SOPInstanceUID', '?')}: {type(exc).__name__}: {exc}"
        ) from exc
    return buffer.getvalue()


def write_encoded(data: bytes, target: Path) -> None:
    """Write ``data`` (from :func:`encode_dataset`) to ``target`` atomically, unchanged: the
    bytes the conformance gate checked are the bytes written. On any error ``target`` is
    left as it was."""
    try:
        with atomic_writer(target) as fh:
            fh.write(data)
    except OSError as exc:  # a full disk, an I/O error, OUTPUT away: may pass
        raise TransientError(f"cannot write {target.name}: {exc.strerror or exc}") from exc
    logger.debug("wrote %s", target.name)


def write_dataset(ds: Dataset, target: Path) -> None:
    """Write ``ds`` as a DICOM file (preamble, ``DICM``, File Meta, PS3.10 §7) atomically.

    The File Meta Information is completed from the dataset (``enforce_file_format``); its
    Transfer Syntax UID must be set. On any error ``target`` is left as it was.
    """
    try:
        with atomic_writer(target) as fh:
            dcmwrite(fh, ds, enforce_file_format=True)
    except OutputError:
        raise
    except Exception as exc:
        cause = _os_error(exc)
        if cause is not None:  # a full disk, an I/O error, OUTPUT away: may pass
            raise TransientError(
                f"cannot write {ds.get('SOPInstanceUID', '?')}: {cause.strerror or cause}"
            ) from exc
        raise OutputError(
            f"cannot write {ds.get('SOPInstanceUID', '?')}: {type(exc).__name__}: {exc}"
        ) from exc
    logger.debug("wrote %s", target.name)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError from the OS behind ``exc`` (pydicom wraps it when writing), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        # pydicom re-raises any error while writing an element as a bare OSError without
        # errno ("With tag ... got exception"): only a real one from the OS counts
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
