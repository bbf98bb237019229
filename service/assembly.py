"""Study assembly: which files make a study, when it is stable, and what each one is.

A study folder is ``INPUT/gateway_<id>/<StudyInstanceUID>/`` holding one file per instance,
possibly in deeper sub-folders, names with or without extension.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import math
import os
import stat
import struct
import tempfile
import zlib
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

from service.errors import TransientError
from service.fsutil import is_within, safe_name
from service.uids import is_valid_uid
from service.values import FileState, Instance, Rejected, Snapshot, Study

logger = logging.getLogger(__name__)


# -- listing and stability -----------------------------------------------------------------


#: Errors of a file that waiting cannot cure (the others may pass: EIO, ENOTCONN, EACCES…).
PERMANENT_ERRNOS = frozenset(
    {errno.ELOOP, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENXIO}
)


def snapshot(folder: Path, input_root: Path, max_depth: int = 8) -> Snapshot:
    """List the regular files under ``folder`` (at most ``max_depth`` sub-folders deep).

    Names starting with ``.`` (temp files of a copy in progress) are left out, symlinked
    folders are not followed, and a symlinked file counts only when it resolves inside
    ``input_root``. A file that vanishes while listing is simply absent; any other error
    raises :class:`TransientError` (a partial listing must not pass for a study). A folder deeper
    than ``max_depth`` is listed as an entry of its own (not entered), so that
    :func:`inspect_file` rejects it with the reason instead of its files going unrecorded.
    """
    snap: Snapshot = {}
    pending: list[tuple[Path, str, int]] = [(folder, "", 0)]
    while pending:
        directory, prefix, depth = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue  # moved away or removed: what is left is the listing
        except OSError as exc:  # I/O error, mount away: a partial listing would lie
            raise TransientError(f"cannot list {prefix or 'the study folder'}: {exc}") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                if entry.is_symlink():
                    if entry.is_dir() or not is_within(Path(entry.path), input_root):
                        logger.debug("skipping symlink %s", rel)
                        continue
                elif entry.is_dir(follow_symlinks=False):
                    if depth < max_depth:
                        pending.append((Path(entry.path), rel + "/", depth + 1))
                        continue
                    # listed itself, so that it is recorded as rejected with the reason
                    logger.warning("%s is deeper than %d folders: ignored", rel, max_depth)
                st = entry.stat()
            except FileNotFoundError:
                continue  # vanished between listing and stat
            except OSError as exc:
                if exc.errno in PERMANENT_ERRNOS:
                    logger.debug("skipping %s: %s", rel, exc.strerror)
                    continue  # a symlink loop, a name too long: no use waiting
                raise TransientError(f"cannot stat {rel}: {exc.strerror or exc}") from exc
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                snap[rel] = FileState(st.st_size, st.st_mtime_ns)
    return snap


class Stability:
    """How long each listing has stayed unchanged, measured on the monotonic clock only.

    File mtimes are compared for equality, never against the wall clock, so files carrying
    timestamps from the future or the past behave the same.
    """

    def __init__(self) -> None:
        self._seen: dict[Hashable, tuple[Snapshot, float]] = {}

    def observe(self, key: Hashable, snap: Snapshot, now: float) -> float:
        """Seconds ``snap`` has been unchanged for ``key``; 0.0 when new or changed."""
        last = self._seen.get(key)
        if last is None or last[0] != snap:
            self._seen[key] = (dict(snap), now)
            return 0.0
        return max(0.0, now - last[1])

    def forget(self, key: Hashable) -> None:
        self._seen.pop(key, None)


# -- inspecting one file -------------------------------------------------------------------

#: Reason recorded when a file stayed truncated for the whole stable period.
INCOMPLETE_REASON = "file is incomplete (truncated) and did not change for the stable period"

_REQUIRED_UIDS = (
    ("SOPClassUID", "(0008,0016)"),
    ("SOPInstanceUID", "(0008,0018)"),
    ("StudyInstanceUID", "(0020,000D)"),
    ("SeriesInstanceUID", "(0020,000E)"),
)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 §7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: Deepest nesting of sequences accepted, defined or undefined length: pydicom and the
#: models walk sequences recursively, so a deeper file could exhaust the stack (PS3.5 §7.5
#: sets no limit; real objects nest a few levels, SR content trees a few tens at most).
MAX_NESTING = 64
#: Default most data elements (items and their elements included) in one file.
DEFAULT_MAX_ELEMENTS = 1_000_000


class _Incomplete(Exception):
    """The file ends before its structure does: most likely still being written."""


class _Malformed(Exception):
    """The file's structure is broken in a way more bytes cannot fix."""


@dataclass(frozen=True)
class _Walk:
    pixel_tag: int | None
    pixel_length: int | None  # None: undefined length (encapsulated, PS3.5 §A.4)


def _is_sequence_tag(tag: int) -> bool | None:
    """Whether the data dictionary gives ``tag`` the VR SQ; None when it does not know it
    (private and unknown tags)."""
    if tag >> 16 & 1:
        return None
    try:
        return "SQ" in dictionary_VR(tag)
    except KeyError:
        return None


class _Reader:
    """Walks DICOM element structure (PS3.5 §7) by seeking, without reading values.

    Every sequence is entered, of defined or undefined length (PS3.5 §7.5), so that the
    nesting depth and the number of elements are bounded before pydicom or a model
    reads the file: deeper than :data:`MAX_NESTING` or more than ``max_elements``
    elements is :class:`_Malformed`.
    """

    def __init__(
        self,
        fh: BinaryIO,
        size: int,
        implicit: bool,
        little: bool,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.fh, self.size, self.implicit = fh, size, implicit
        self.e = "<" if little else ">"
        self.max_elements = max_elements
        self.elements = 0

    def read(self, n: int, what: str) -> bytes:
        data = self.fh.read(n)
        if len(data) < n:
            raise _Incomplete(f"file ends inside {what} at byte {self.size}")
        return data

    def skip(self, length: int, what: str) -> None:
        target = self.fh.tell() + length
        if target > self.size:
            raise _Incomplete(
                f"{what} declares {length} bytes but the file ends {target - self.size} bytes short"
            )
        self.fh.seek(target)

    def element(self, implicit: bool) -> tuple[int, bytes, int]:
        """Tag, VR (b"" when implicit or an item tag) and length of the next element."""
        self.elements += 1
        if self.elements > self.max_elements:
            raise _Malformed(f"more than {self.max_elements} data elements")
        group, elem = struct.unpack(self.e + "HH", self.read(4, "an element tag"))
        tag = group << 16 | elem
        if group == 0xFFFE or implicit:
            return tag, b"", struct.unpack(self.e + "L", self.read(4, "an element length"))[0]
        vr = self.read(2, "an element VR")
        if vr in _LONG_VRS:
            self.read(2, "an element header")
            return tag, vr, struct.unpack(self.e + "L", self.read(4, "an element length"))[0]
        return tag, vr, struct.unpack(self.e + "H", self.read(2, "an element length"))[0]

    def _starts_with_item(self, length: int) -> bool:
        """Whether a value of ``length`` bytes here begins with an Item (a sequence)."""
        if length < 8:
            return False
        pos = self.fh.tell()
        head = self.fh.read(8)
        self.fh.seek(pos)
        if len(head) < 8:
            return False
        group, elem, item_length = struct.unpack(self.e + "HHL", head)
        fits = bool(item_length == _UNDEFINED or item_length <= length - 8)
        return (group << 16 | elem) == _ITEM and fits

    def _holds_sequence(self, tag: int, vr: bytes, implicit: bool, length: int) -> bool:
        """Whether a defined-length value is a sequence that pydicom would parse: SQ, or an
        implicit / UN value the dictionary calls SQ (PS3.5 §6.2.2), or a private or
        unknown one that starts with an Item."""
        if vr == b"SQ":
            return True
        if not (implicit or vr == b"UN") or tag in _PIXEL_TAGS:
            return False
        known = _is_sequence_tag(tag)
        return known if known is not None else self._starts_with_item(length)

    def dataset(
        self, implicit: bool, nested: bool, depth: int = 0, end: int | None = None
    ) -> _Walk:
        """Walk a data set to EOF (top level), to ``end`` (an item of defined length) or to
        its Item Delimitation Item (an item of undefined length)."""
        if depth > MAX_NESTING:
            raise _Malformed(f"sequences nested deeper than {MAX_NESTING} levels")
        pixel_tag = pixel_length = None
        limit = self.size if end is None else end
        while (nested and end is None) or self.fh.tell() < limit:
            tag, vr, length = self.element(implicit)
            name = f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
            if tag == _ITEM_END and nested and end is None:
                return _Walk(None, None)
            if tag >> 16 == 0xFFFE:
                raise _Malformed(f"unexpected item tag {name} in a data set")
            if tag in _PIXEL_TAGS and not nested:
                pixel_tag, pixel_length = tag, (None if length == _UNDEFINED else length)
            if length == _UNDEFINED:
                # SQ, UN holding an implicit little endian SQ (PS3.5 §6.2.2), or
                # encapsulated Pixel Data: a series of items up to a delimiter.
                fragments = tag in _PIXEL_TAGS or vr in (b"OB", b"OW")
                self.items(implicit or vr == b"UN", depth + 1, name, fragments)
            elif self._holds_sequence(tag, vr, implicit, length):
                self.skip(length, name)  # the whole value is there: then walk it
                self.fh.seek(self.fh.tell() - length)
                self.items(implicit or vr == b"UN", depth + 1, name, False, self.fh.tell() + length)
            else:
                self.skip(length, name)
        if end is not None and self.fh.tell() != end:
            raise _Malformed(f"an element overruns its item by {self.fh.tell() - end} bytes")
        return _Walk(pixel_tag, pixel_length)

    def items(
        self, implicit: bool, depth: int, name: str, fragments: bool, end: int | None = None
    ) -> None:
        """The items of a sequence (or the fragments of encapsulated pixel data, which are
        skipped), up to its Sequence Delimitation Item or to ``end`` (defined length)."""
        if depth > MAX_NESTING:
            raise _Malformed(f"sequences nested deeper than {MAX_NESTING} levels")
        while end is None or self.fh.tell() < end:
            tag, _vr, length = self.element(True)
            if tag == _SEQ_END and end is None:
                return
            if tag != _ITEM:
                raise _Malformed(f"{name} holds a non-item tag {tag:08X}")
            if length == _UNDEFINED:
                self.dataset(implicit, nested=True, depth=depth)
            elif fragments:
                self.skip(length, f"an item of {name}")
            else:
                self.skip(length, f"an item of {name}")
                self.fh.seek(self.fh.tell() - length)
                self.dataset(implicit, nested=True, depth=depth, end=self.fh.tell() + length)
        if self.fh.tell() != end:
            raise _Malformed(f"an item overruns {name} by {self.fh.tell() - end} bytes")


def _dataset_start(fh: BinaryIO, size: int) -> tuple[int, str]:
    """Offset of the data set after preamble and File Meta (PS3.10 §7.1), and its TS UID."""
    fh.seek(0)
    start = 132 if fh.read(132)[128:132] == b"DICM" else 0
    fh.seek(start)
    reader = _Reader(fh, size, implicit=False, little=True)
    ts = ""
    while fh.tell() + 4 <= size:
        pos = fh.tell()
        if struct.unpack("<H", fh.read(2))[0] != 0x0002:
            fh.seek(pos)
            break
        fh.seek(pos)
        tag, _vr, length = reader.element(False)
        if tag == 0x00020010:
            ts = reader.read(length, "the Transfer Syntax UID").decode("ascii", "replace")
            ts = ts.strip("\x00 ")
        else:
            reader.skip(length, "a File Meta element")
    return fh.tell(), ts


def _encoding(fh: BinaryIO, start: int, ts: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the data set, guessed before pydicom reads it."""
    fh.seek(start)
    head = fh.read(6)
    # Like pydicom, trust the bytes over the Transfer Syntax: some writers disagree.
    implicit = not (len(head) == 6 and head[4:6].isalpha() and head[4:6].isupper())
    if ts:
        return implicit, ts != ExplicitVRBigEndian
    return implicit, not (len(head) >= 2 and head[0] == 0)


def _looks_like_dicom(head: bytes) -> bool:
    """DICM prefix (PS3.10 §7.1), or a data set starting with group 0000, 0002 or 0008."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    little, big = struct.unpack("<H", head[:2])[0], struct.unpack(">H", head[:2])[0]
    return little in (0, 2, 8) or big in (2, 8)


def _expected_native_bytes(ds: Dataset, rows: int, columns: int, frames: int) -> int | None:
    bits = ds.get("BitsAllocated")
    samples = ds.get("SamplesPerPixel", 1) or 1
    if not isinstance(bits, int) or bits <= 0:
        return None
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # two values per pixel after 4:2:2 subsampling (PS3.3 C.7.6.3.1.2)
    return math.ceil(rows * columns * frames * int(samples) * bits / 8)


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # an unparseable value of an optional attribute
        return ""
    return str(value).strip() if value is not None else ""


def _inspect(
    path: Path, max_file_bytes: int, max_pixels: int, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Instance | Rejected:
    """Like :func:`inspect_file`, but an incomplete file raises :class:`_Incomplete`."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise _Incomplete(f"cannot stat file: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return Rejected(path, "folder nested deeper than the maximum depth: its files are not read")
    if not stat.S_ISREG(st.st_mode):
        return Rejected(path, "not a regular file")
    if st.st_size == 0:
        return Rejected(path, "empty file (0 bytes)")
    if st.st_size > max_file_bytes:
        return Rejected(
            path, f"file of {st.st_size} bytes exceeds the limit of {max_file_bytes} bytes"
        )
    with open(path, "rb") as fh:
        if not _looks_like_dicom(fh.read(136)):
            return Rejected(path, "not a DICOM file: no DICM prefix (PS3.10 §7.1) and no data set")
        # The structure is walked (depth, element count, inflated size) before pydicom
        # parses anything: a hostile file is refused here and never reaches a model.
        try:
            start, ts = _dataset_start(fh, st.st_size)
            implicit, little = _encoding(fh, start, ts)
            fh.seek(start)
            if ts == DeflatedExplicitVRLittleEndian:
                walk = _check_deflated(fh, max_file_bytes, max_elements)
            else:
                reader = _Reader(fh, st.st_size, implicit, little, max_elements)
                walk = reader.dataset(implicit, nested=False)
        except _Malformed as exc:
            return Rejected(path, f"malformed DICOM: {exc}")
        fh.seek(0)
        try:
            ds = dcmread(fh, stop_before_pixels=True, force=True)
        except OSError:
            raise  # an I/O error is not a verdict on the content
        except Exception as exc:  # pydicom raises many types on broken input
            return Rejected(path, f"cannot parse the DICOM header ({type(exc).__name__})")
        result = _check_header(path, ds, walk, max_pixels)
        if isinstance(result, Rejected):
            return result
        fh.seek(0)
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise _Incomplete("file changed while being read")
    return dataclasses.replace(result, size=st.st_size, sha256=digest)


def _check_deflated(fh: BinaryIO, max_bytes: int, max_elements: int) -> _Walk:
    """A Deflated data set (PS3.5 §A.5) is complete when its deflate stream ends; it is
    inflated (at most ``max_bytes``, in bounded chunks: a zip bomb is refused) into a
    temporary file and walked like any other."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as out:
        total = 0

        def keep(data: bytes) -> None:
            nonlocal total
            total += len(data)
            if total > max_bytes:
                raise _Malformed(f"the deflated data set inflates to more than {max_bytes} bytes")
            out.write(data)

        try:
            while not inflater.eof and (chunk := fh.read(1 << 20)):
                keep(inflater.decompress(chunk, 1 << 20))
                while inflater.unconsumed_tail and not inflater.eof:
                    keep(inflater.decompress(inflater.unconsumed_tail, 1 << 20))
        except zlib.error as exc:
            raise _Malformed(f"broken deflate stream: {exc}") from None
        if not inflater.eof:
            raise _Incomplete("the deflated data set ends early")
        out.seek(0)
        try:
            walker = _Reader(cast(BinaryIO, out), total, False, True, max_elements)
            walker.dataset(False, nested=False)
        except _Incomplete as exc:  # the stream is whole: its data set cannot grow
            raise _Malformed(f"the inflated data set is cut short: {exc}") from None
    return _Walk(0x7FE00010, None)  # accept whatever pixel data it holds


def _check_header(path: Path, ds: Dataset, walk: _Walk, max_pixels: int) -> Instance | Rejected:
    uids: dict[str, str] = {}
    for keyword, tag in _REQUIRED_UIDS:
        value = _text(ds, keyword)
        if not value:
            return Rejected(path, f"missing {keyword} {tag}")
        if not is_valid_uid(value):
            return Rejected(path, f"invalid {keyword} {value[:80]!r} (PS3.5 §9.1)")
        uids[keyword] = value
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return Rejected(path, "invalid Rows, Columns or Number of Frames")
    if rows * columns * max(frames, 1) > max_pixels:
        return Rejected(
            path,
            f"{rows} x {columns} x {frames} frames = {rows * columns * frames} pixels "
            f"exceeds the limit of {max_pixels}",
        )
    issuer = _text(ds, "IssuerOfPatientID")
    if rows and columns:
        if walk.pixel_tag is None:
            raise _Incomplete("image attributes present but the file ends before Pixel Data")
        expected = _expected_native_bytes(ds, rows, columns, max(frames, 1))
        if walk.pixel_length is not None and expected and walk.pixel_length < expected:
            return Rejected(
                path,
                f"native Pixel Data holds {walk.pixel_length} bytes, Rows x Columns x Samples "
                f"x Bits Allocated x frames requires {expected} (PS3.5 §8.1.1)",
            )
    return Instance(
        path=path,
        size=0,
        sha256="",
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        rows=rows,
        columns=columns,
        frames=max(frames, 1),
        patient_key=_identity_key(_text(ds, "PatientID")),
        issuer_key=_identity_key(issuer) if issuer else "",
    )


#: Salt of the patient identity digests: drawn per process, never stored or logged, so a
#: digest cannot be looked up against a list of identifiers.
_IDENTITY_SALT = os.urandom(16)


def _identity_key(value: str) -> str:
    return hashlib.sha256(_IDENTITY_SALT + value.encode("utf-8", "surrogateescape")).hexdigest()


def patient_conflict(instances: Iterable[Instance]) -> str:
    """Why ``instances`` cannot be one study's, or "": every instance of a study must be of
    one patient (PS3.3 C.7.1.1: PatientID, with IssuerOfPatientID where present, identifies
    the patient; a study belongs to one patient, PS3.3 A.1.2.2). The reason names what
    differs, never the identifiers."""
    instances = list(instances)
    ids = {i.patient_key for i in instances}
    issuers = {i.issuer_key for i in instances if i.issuer_key}
    differ = [
        name for name, keys in (("PatientID", ids), ("IssuerOfPatientID", issuers)) if len(keys) > 1
    ]
    if not differ:
        return ""
    patients = max(len(ids), len(issuers))
    return (
        f"instances of {patients} different patients ({'/'.join(differ)} differ) in one "
        "study: refused"
    )


def inspect_file(
    path: Path,
    *,
    max_file_bytes: int,
    max_pixels: int,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Instance | Rejected | None:
    """Parse one file's header: an :class:`Instance`, a :class:`Rejected`, or None.

    None means the file looks incomplete (still being copied): the caller waits, and once the
    study is stable records it as rejected with :func:`incomplete_reason`. The size budget
    is checked before opening, the structure (sequence depth at most :data:`MAX_NESTING`,
    at most ``max_elements`` elements, a deflated data set's inflated size) before pydicom
    parses it, and the pixel budget before pixel data is read; the file is only ever read.
    """
    undecodable = _undecodable_name(path)
    if undecodable is not None:
        return Rejected(path, f"file name is not valid UTF-8: {undecodable}")
    try:
        return _inspect(path, max_file_bytes, max_pixels, max_elements)
    except _Incomplete:
        return None
    except FileNotFoundError:
        return None  # vanished while being read: the listing changes, the study waits
    except OSError as exc:  # I/O error, mount away, no permission: may pass
        logger.debug("cannot read %s: %s", path, exc.strerror)
        transient = exc.errno not in PERMANENT_ERRNOS
        return Rejected(path, f"file cannot be read: {exc.strerror or exc}", transient=transient)


def _undecodable_name(path: Path) -> str | None:
    """The last component of ``path`` that is not valid UTF-8, its bytes escaped (``\\xff``),
    or None when every component is. Such a name cannot be recorded or shown faithfully,
    so the file is refused rather than counted as a duplicate of its UTF-8 twin."""
    for part in reversed(path.parts):
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(part).decode("utf-8", "backslashreplace")
    return None


def incomplete_reason(path: Path, prefix: str = INCOMPLETE_REASON) -> str:
    """Why :func:`inspect_file` found ``path`` incomplete, for the recorded rejection."""
    try:
        _inspect(path, max_file_bytes=2**63, max_pixels=2**63)
    except _Incomplete as exc:
        return f"{prefix}: {exc}"
    except OSError as exc:
        return f"file cannot be read: {exc.strerror}"
    return prefix


# -- assembling a study --------------------------------------------------------------------


def study_uid_from_folder(name: str) -> str | None:
    """The study folder's name when it is a safe single path component, else None."""
    return safe_name(name)


def inputs_digest(instances: Iterable[Instance]) -> str:
    """SHA-256 over the sorted (SOP Instance UID, content SHA-256) pairs.

    Independent of file names and order: renaming or moving files keeps the digest.
    """
    h = hashlib.sha256()
    for sop_uid, digest in sorted({(i.sop_instance_uid, i.sha256) for i in instances}):
        h.update(f"{sop_uid}\0{digest}\n".encode())
    return h.hexdigest()


_Result = Instance | Rejected | None


class Assembler:
    """Builds :class:`Study` objects, re-inspecting only files whose size or mtime changed.

    Not thread-safe: use one assembler from one thread.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], dict[str, tuple[FileState, _Result]]] = {}

    def forget(self, gateway_id: str, study_uid: str) -> None:
        """Drop the cached inspections of one study (e.g. once it is finished)."""
        self._cache.pop((gateway_id, study_uid), None)

    def assemble(
        self,
        gateway_id: str,
        study_uid: str,
        folder: Path,
        snap: Snapshot,
        *,
        max_file_bytes: int,
        max_pixels: int,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> Study:
        """The instances, rejections and incomplete files of the study folder listed in ``snap``."""
        old = self._cache.get((gateway_id, study_uid), {})
        new: dict[str, tuple[FileState, _Result]] = {}
        for rel in sorted(snap):
            state = snap[rel]
            cached = old.get(rel)
            if cached is not None and cached[0] == state:
                result = cached[1]
            else:
                result = inspect_file(
                    folder / rel,
                    max_file_bytes=max_file_bytes,
                    max_pixels=max_pixels,
                    max_elements=max_elements,
                )
            new[rel] = (state, result)
        self._cache[(gateway_id, study_uid)] = {  # an I/O error is read again next time
            rel: item
            for rel, item in new.items()
            if not (isinstance(item[1], Rejected) and item[1].transient)
        }
        return collate(
            gateway_id, study_uid, folder, [(rel, result) for rel, (_state, result) in new.items()]
        )


def collate(
    gateway_id: str, study_uid: str, folder: Path, inspected: Iterable[tuple[str, _Result]]
) -> Study:
    """The study made of inspected files (relative path from ``folder``, what
    :func:`inspect_file` found), by the service's rules: an incomplete file is listed as
    such; a file of another study is rejected; of several files with one SOP Instance UID
    the one with the lowest relative path is used when all have identical bytes (the others
    are rejected as duplicates, ``quarantine=False``), and all are rejected when their
    contents differ. Instances of more than one patient make the whole study ``refused``
    (:func:`patient_conflict`)."""
    study = Study(gateway_id, study_uid, folder)
    by_uid: dict[str, list[tuple[str, Instance]]] = {}
    for rel, result in sorted(inspected, key=lambda item: item[0]):
        if result is None:
            study.incomplete.append(folder / rel)
        elif isinstance(result, Rejected) and result.transient:
            study.unreadable.append(result)
        elif isinstance(result, Rejected):
            study.rejected.append(result)
        elif result.study_instance_uid != study_uid:
            study.rejected.append(
                Rejected(
                    result.path,
                    f"StudyInstanceUID {result.study_instance_uid} differs from the "
                    f"study folder name {study_uid}",
                )
            )
        else:
            by_uid.setdefault(result.sop_instance_uid, []).append((rel, result))
    for sop_uid, copies in by_uid.items():
        keep_rel, keep = copies[0]  # lowest relative path
        if len({inst.sha256 for _rel, inst in copies}) > 1:
            logger.warning(
                "gateway %s study %s: %d files with different content for SOPInstanceUID %s",
                gateway_id,
                study_uid,
                len(copies),
                sop_uid,
            )
            names = ", ".join(rel for rel, _inst in copies)
            study.rejected.extend(
                Rejected(
                    inst.path,
                    f"conflicting content for SOPInstanceUID {sop_uid}: files {names} differ",
                )
                for _rel, inst in copies
            )
            continue
        study.instances.append(keep)
        study.rejected.extend(
            Rejected(inst.path, f"duplicate of {keep_rel}, identical bytes", quarantine=False)
            for _rel, inst in copies[1:]
        )
    study.refused = patient_conflict(study.instances)
    return study
