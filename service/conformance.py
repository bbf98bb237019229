"""The conformance gate every output object passes before it is sent to a PACS.

:func:`check_file` reads a written file back and lists its problems (empty list: it
passes); a failing object is not sent, and :func:`quarantine_file` moves it aside. The
pipeline uses :func:`check_dataset` instead: the same checks on the data set in memory and
the exact bytes that are written for it (:func:`service.writers.encode_dataset`), without
reading the file back; the bytes are parsed strictly and must round-trip, and the
value-level checks run on the in-memory data set those bytes encode.

Strict reading is done *locally*, without touching pydicom's process-wide
``config.settings.reading_validation_mode`` (other threads read clinical input files at the
same time and must keep the lenient default):

* the file is parsed from memory with ``dcmread(..., force=False)`` (preamble, ``DICM`` and
  File Meta Information required, PS3.10 §7.1) through a stream that notices short reads,
  so a truncated file is a problem although pydicom itself would only warn;
* every element value is checked against its VR with
  ``pydicom.valuerep.validate_value(..., config.RAISE)`` (PS3.5 §6.2), which is what strict
  reading would do, one value at a time;
* the dataset is written again with ``enforce_file_format=True`` into memory and read back.

Problem messages name attributes, tags and UIDs only, never values that could identify a
patient.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread, dcmwrite
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from service.dicomrules import BULK_VRS, kind_of, requirements, value_problems
from service.errors import OutputError
from service.fsutil import safe_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One problem found in one output file."""

    path: Path
    message: str


#: Sequences through which our objects reference their sources by Referenced SOP Instance
#: UID: the Source Image Sequence (PS3.3 C.7.6.1.1.4) and the Referenced SOP Sequence, found
#: in SR content items (C.17.3.2.x, IMAGE/COMPOSITE) and in the Current Requested Procedure
#: Evidence Sequence > Referenced Series Sequence (C.17.2). The Referenced Image Sequence
#: (C.7.6.1) is not checked: a derived image keeps the source's own context references
#: (e.g. a localizer the gateway never received).
_REFERENCE_SEQUENCES = frozenset({"SourceImageSequence", "ReferencedSOPSequence"})


class _ShortReadStream(io.BytesIO):
    """An in-memory file that records reads cut short by the end of the data.

    pydicom reads the next element header 8 bytes at a time and takes an empty result as
    the end of the data set; any other short read means the file was truncated.
    """

    truncated = False

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if size is not None and 0 <= len(data) < size and (data or size != 8):
            self.truncated = True
        return data


def check_file(
    path: Path,
    *,
    source_sop_uids: AbstractSet[str],
    seen_uids: set[str] | None = None,
    run_sop_uids: AbstractSet[str] = frozenset(),
) -> list[str]:
    """The problems of the output file ``path``; an empty list means it may be sent.

    ``source_sop_uids`` are the SOP Instance UIDs of the study's source instances: every
    instance the object references must be one of them or one of ``run_sop_uids``, the other
    objects written by the same run (an SR may reference the run's summary image). Put the
    run's own objects in ``run_sop_uids``, not in ``source_sop_uids``: an output whose SOP
    Instance UID equals a source UID is reported as a collision. When ``seen_uids`` is given,
    a SOP Instance UID already in it is reported as a duplicate, and the object's UID is
    added to it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"cannot read output file: {exc.strerror or type(exc).__name__}"]
    return _check_bytes(data, None, path.name, source_sop_uids, run_sop_uids, seen_uids)


def check_dataset(
    ds: Dataset,
    data: bytes,
    *,
    name: str,
    source_sop_uids: AbstractSet[str],
    seen_uids: set[str] | None = None,
    run_sop_uids: AbstractSet[str] = frozenset(),
) -> list[str]:
    """:func:`check_file` for the output ``ds`` about to be written as ``data``.

    ``data`` must be ``ds`` encoded by :func:`service.writers.encode_dataset`, and those
    bytes, not a new encoding, are what is written and sent. ``data`` is parsed strictly,
    its File Meta Information checked and it must round-trip (as in :func:`check_file`);
    since ``ds`` encodes to exactly ``data``, the attribute, value, reference and UID checks
    run on ``ds`` itself, whose values are already decoded (reading them back from ``data``
    is most of the cost of :func:`check_file`). ``name`` (the file's name) is only logged.
    """
    return _check_bytes(data, ds, name, source_sop_uids, run_sop_uids, seen_uids)


def _check_bytes(
    data: bytes,
    ds: Dataset | None,
    name: str,
    source_sop_uids: AbstractSet[str],
    run_sop_uids: AbstractSet[str],
    seen_uids: set[str] | None,
) -> list[str]:
    """The checks of :func:`check_file` on the encoded object ``data``; the content checks
    run on ``ds`` (the data set ``data`` encodes) when given, else on ``data`` parsed."""
    parsed, problems = _read_strict(data)
    if parsed is None:
        return problems
    problems += _check_encoding(parsed, data)
    content = parsed if ds is None else ds
    problems += _check_content(content, parsed, source_sop_uids, run_sop_uids, seen_uids)
    if problems:
        logger.info("output %s fails conformance: %d problem(s)", name, len(problems))
    return problems


def _check_encoding(parsed: Dataset, data: bytes) -> list[str]:
    """The checks of the encoded file: File Meta Information and round trip."""
    problems = _check_file_meta(parsed)  # first: the round trip rewrites parsed.file_meta
    problems += _check_round_trip(parsed, data)
    return problems


def _check_content(
    ds: Dataset,
    parsed: Dataset,
    source_sop_uids: AbstractSet[str],
    run_sop_uids: AbstractSet[str],
    seen_uids: set[str] | None,
) -> list[str]:
    """The checks of the data set's attributes and values (``parsed``: ``ds`` as read from
    its encoding, for the File Meta Information and the Pixel Data length as written)."""
    problems = _check_required(ds)
    problems += _check_pixel_data_length(parsed)
    problems += _check_values_and_uids(ds, parsed.file_meta)
    problems += _check_references(ds, {*source_sop_uids, *run_sop_uids})
    problems += _check_uniqueness(ds, source_sop_uids, run_sop_uids, seen_uids)
    return problems


def check_files(
    paths: Iterable[Path],
    *,
    source_sop_uids: AbstractSet[str],
    run_sop_uids: AbstractSet[str] = frozenset(),
    seen_uids: set[str] | None = None,
) -> list[Finding]:
    """:func:`check_file` for every output of one run, sharing ``seen_uids``."""
    seen = set() if seen_uids is None else seen_uids
    return [
        Finding(path, message)
        for path in paths
        for message in check_file(
            path, source_sop_uids=source_sop_uids, seen_uids=seen, run_sop_uids=run_sop_uids
        )
    ]


def check_datasets(
    outputs: Iterable[tuple[Path, Dataset, bytes]],
    *,
    source_sop_uids: AbstractSet[str],
    run_sop_uids: AbstractSet[str] = frozenset(),
    seen_uids: set[str] | None = None,
) -> list[Finding]:
    """:func:`check_dataset` for every output (its path, data set and encoded bytes) of one
    run, sharing ``seen_uids``."""
    seen = set() if seen_uids is None else seen_uids
    return [
        Finding(path, message)
        for path, ds, data in outputs
        for message in check_dataset(
            ds,
            data,
            name=path.name,
            source_sop_uids=source_sop_uids,
            seen_uids=seen,
            run_sop_uids=run_sop_uids,
        )
    ]


def _read_strict(data: bytes) -> tuple[Dataset | None, list[str]]:
    """Parse a PS3.10 file from ``data``; return the dataset, or None and the reason."""
    stream = _ShortReadStream(data)
    try:
        ds = dcmread(stream, force=False)
    except Exception as exc:
        return None, [f"not a readable DICOM file (PS3.10 §7): {_describe(exc)}"]
    if stream.truncated:
        return None, [f"file is truncated: data ends inside an element ({len(data)} bytes)"]
    return ds, []


def _check_file_meta(ds: Dataset) -> list[str]:
    """File Meta Information must match the data set (PS3.10 §7.1)."""
    meta = ds.file_meta
    problems = []
    if not meta.get("TransferSyntaxUID"):
        problems.append("file meta: TransferSyntaxUID (0002,0010) missing (PS3.10 §7.1)")
    for meta_kw, ds_kw in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        if meta.get(meta_kw) != ds.get(ds_kw):
            problems.append(
                f"file meta: {meta_kw} {meta.get(meta_kw)!r} differs from {ds_kw} "
                f"{ds.get(ds_kw)!r} (PS3.10 §7.1)"
            )
    return problems


def _check_round_trip(ds: Dataset, original: bytes | None = None) -> list[str]:
    """The data set must encode again as a PS3.10 file and read back the same.

    ``original`` are the bytes ``ds`` was parsed from: when encoding ``ds`` again gives
    exactly these bytes, reading them back gives ``ds`` again, so the element-by-element
    comparison is skipped (the usual case for files pydicom wrote).
    """
    buffer = io.BytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True)
        if original is not None and buffer.getbuffer() == original:
            return []  # the same bytes parse to the same data set: nothing can differ
        again = dcmread(io.BytesIO(buffer.getvalue()), force=False)
    except Exception as exc:
        return [f"does not round-trip through pydicom: {_describe(exc)}"]
    changed = [elem.keyword or str(elem.tag) for elem in again if ds.get(elem.tag) != elem] + [
        str(tag) for tag in set(ds.keys()) - set(again.keys()) if tag.element != 0
    ]
    # group lengths (gggg,0000) are retired and dropped by pydicom (PS3.5 §7.2)
    if changed:
        return [f"does not round-trip through pydicom: changed {sorted(changed)[:5]}"]
    return []


def _check_required(ds: Dataset) -> list[str]:
    """Type 1 and Type 2 attributes of the mandatory modules of the object's IOD (PS3.3
    Annex A and C, PS3.5 §7.4), from the standard's tables (:mod:`service.dicomrules`),
    inside every item of the sequences that hold them."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class:
        return ["SOPClassUID missing (Type 1, PS3.3 C.12.1 SOP Common Module)"]
    reqs = requirements(sop_class)
    if not reqs:
        return [
            f"SOPClassUID {sop_class[:80]} is not a storage SOP class of the standard's "
            "tables: its IOD and required attributes are unknown (PS3.4 Annex B)"
        ]
    problems = []
    for req in reqs:
        missing: list[str] = []
        empty: list[str] = []
        for item, where in _items(ds, req.path):
            if req.keyword not in item:
                missing.append(where)
            elif req.type == "1" and item[req.keyword].is_empty:
                empty.append(where)
        for what, places in (("missing", missing), ("is empty", empty)):
            if places:
                more = f" (and in {len(places) - 1} other item(s))" if len(places) > 1 else ""
                problems.append(
                    f"{places[0]}{req.keyword} {what}{more} (Type {req.type}, {req.where})"
                )
    if kind_of(ds) == "sr" and ds.get("ValueType", "CONTAINER") != "CONTAINER":
        problems.append(
            f"ValueType of the root content item is {ds.ValueType!r}, not 'CONTAINER' "
            "(PS3.3 C.17.3)"
        )
    return problems


def _items(ds: Dataset, path: tuple[str, ...], where: str = "") -> Iterator[tuple[Dataset, str]]:
    """Every data set at ``path`` (sequence keywords) below ``ds``, with its location."""
    if not path:
        yield ds, where
        return
    head, rest = path[0], path[1:]
    if head not in ds or ds[head].VR != "SQ":
        return  # an absent sequence is reported by its own requirement, when it has one
    for index, item in enumerate(ds[head].value, start=1):
        yield from _items(item, rest, f"{where}{head}[{index}] > ")


def _check_pixel_data_length(ds: Dataset) -> list[str]:
    """Native (uncompressed) Pixel Data must hold every frame (PS3.5 §8.1.1)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if "PixelData" not in ds or not syntax or UID(syntax).is_compressed:
        return []
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, KeyError, TypeError, ValueError):
        expected = None
    if not isinstance(expected, int):
        return []  # an Image Pixel attribute is missing or bad: reported elsewhere
    actual = len(ds.PixelData)
    if actual not in (expected, expected + expected % 2):
        return [
            f"PixelData holds {actual} bytes; Rows, Columns, SamplesPerPixel, BitsAllocated "
            f"and NumberOfFrames need {expected + expected % 2} (PS3.5 §8.1.1)"
        ]
    return []


def _walk(ds: Dataset) -> Iterator[tuple[Dataset, DataElement | RawDataElement]]:
    """Every element of ``ds`` and of its sequence items, in ``iterall`` order, with the
    data set holding it. Elements still raw (as read) stay raw, except sequences, which are
    parsed to be walked: converting every value is what makes checking slow."""
    for tag in sorted(ds.keys()):
        elem = ds.get_item(tag)
        if elem is None:
            continue
        if isinstance(elem, RawDataElement) and not _plain_raw(elem):
            elem = ds[tag]
        yield ds, elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _plain_raw(elem: RawDataElement) -> bool:
    """A raw element whose value converts from its bytes alone: not a sequence, not UN
    (converted with the dictionary's VR), no VR to resolve from other elements."""
    return elem.VR is not None and elem.VR not in ("SQ", "UN") and " or " not in elem.VR


def _check_values_and_uids(ds: Dataset, file_meta: Dataset) -> list[str]:
    """Every value must conform to its VR (PS3.5 §6.2); every UID to PS3.5 §9.1.

    A raw element identical to one already checked (same tag, VR, encoded bytes and
    character set: e.g. the repeated codes of an SR) has the same problems; it is not
    converted again.
    """
    problems: list[str] = []
    checked: dict[tuple[object, ...], list[str]] = {}
    for parent in (file_meta, ds):
        for holder, elem in _walk(parent):
            if elem.VR in BULK_VRS:
                continue
            if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes | None):
                key = (elem.tag, elem.VR, elem.value, tuple(holder._character_set))
                if key not in checked:
                    checked[key] = value_problems(holder[elem.tag])
                problems += checked[key]
            else:
                problems += value_problems(elem)
    return problems


def _check_references(ds: Dataset, known: AbstractSet[str]) -> list[str]:
    """Every referenced SOP instance must be a source instance or an object of the run."""
    problems = []
    for _, elem in _walk(ds):
        if not isinstance(elem, DataElement) or elem.VR != "SQ":
            continue  # sequences are always parsed by _walk
        if elem.keyword not in _REFERENCE_SEQUENCES:
            continue
        for item in elem.value:
            uid = item.get("ReferencedSOPInstanceUID")
            if not uid:
                problems.append(f"{elem.keyword} item without ReferencedSOPInstanceUID")
            elif str(uid) not in known:
                problems.append(f"{elem.keyword} references unknown SOP instance {uid}")
    return problems


def _check_uniqueness(
    ds: Dataset,
    source_sop_uids: AbstractSet[str],
    run_sop_uids: AbstractSet[str],
    seen_uids: set[str] | None,
) -> list[str]:
    """A new object needs a new SOP Instance UID (PS3.3 C.12.1.1.1)."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        return []
    problems = []
    if uid in source_sop_uids and uid not in run_sop_uids:
        problems.append(f"SOPInstanceUID {uid} is the UID of a source instance")
    if seen_uids is not None:
        if uid in seen_uids:
            problems.append(f"SOPInstanceUID {uid} is used by another output object")
        seen_uids.add(uid)
    return problems


def quarantine_file(path: Path, quarantine_root: Path, gateway_id: str) -> Path:
    """Move the output ``path`` to ``quarantine_root/gateway_<id>/``; return its new path.

    An existing file there is never overwritten: ``<stem>-1.dcm``, ``<stem>-2.dcm``... are
    tried in turn (hard link then unlink, so taking a name is atomic).
    """
    folder_name = f"gateway_{gateway_id}"
    if safe_name(gateway_id) is None or safe_name(folder_name) is None:
        raise OutputError(f"unusable gateway id {gateway_id[:80]!r}")
    folder = quarantine_root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    for target in _candidates(folder, path.name):
        try:
            os.link(path, target)
        except FileExistsError:
            continue
        except OSError:  # no hard links here: check, then rename
            if target.exists():
                continue
            os.replace(path, target)
        else:
            os.unlink(path)
        logger.warning("quarantined output %s as %s", path.name, target.name)
        return target
    raise AssertionError("unreachable")  # pragma: no cover


def _candidates(folder: Path, name: str) -> Iterator[Path]:
    yield folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    number = 1
    while True:
        yield folder / f"{stem}-{number}{suffix}"
        number += 1


def _describe(exc: BaseException) -> str:
    first_line = next(iter(str(exc).splitlines()), "")
    return f"{type(exc).__name__}: {first_line[:200]}"


__all__ = [
    "Finding",
    "check_dataset",
    "check_datasets",
    "check_file",
    "check_files",
    "kind_of",
    "quarantine_file",
]
