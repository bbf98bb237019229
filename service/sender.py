"""Send DICOM files to a PACS with C-STORE (PS3.4 Annex B, PS3.7 §9.1.1).

One call, one association attempt, no retry: the caller (the ledger) decides when to try
again. Network problems come back as :class:`SendStatus` values, never as exceptions.

Speed: pynetdicom negotiates, releases and aborts the association, but the C-STOREs in
between go straight over its socket from this thread (:func:`_send_all`): pynetdicom's
per-PDU hand-offs between its threads, its polling loops and its pydicom-built DIMSE
messages cost 2-6 times dcmtk's ``storescu`` time per instance. Files are streamed from
disk when the peer accepts their own transfer syntax, fragmented to the peer's maximum PDU
length, the socket has ``TCP_NODELAY`` (a C-STORE is a request/response exchange of small
PDUs that Nagle's algorithm would delay), and there is one request in flight at a time.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import AddressInformation, AssociationSocket

from service.config import PacsConfig

logger = logging.getLogger(__name__)

#: PS3.8 §9.3.1 allows at most 128 presentation contexts (odd IDs 1-255) per association.
MAX_CONTEXTS = 128
#: Uncompressed transfer syntaxes every Storage SCP supports (PS3.5 §10.1), offered as fallback.
FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Our receive limit for PDUs from the peer (PS3.8 §9.3.1); 0 means unlimited.
MAX_PDU = 0


class SendStatus(enum.StrEnum):
    """Outcome of one instance (first three) or of the whole association."""

    SUCCESS = "success"
    WARNING = "warning"  # PS3.4 B.2.3: 0xB000, 0xB006, 0xB007 (stored, with changes)
    FAILURE = "failure"  # any failure status from the peer (0xA7xx, 0xA9xx, 0xCxxx...)
    REFUSED = "refused"  # no TCP connection: nothing listening or host unreachable
    REJECTED = "rejected"  # A-ASSOCIATE-RJ (PS3.8 §7.1.1.9)
    ABORTED = "aborted"  # A-ABORT / A-P-ABORT from the peer or a dropped connection
    TIMED_OUT = "timed_out"  # no answer within timeout_seconds
    NO_CONTEXT = "no_context"  # the peer accepted no presentation context for the object
    ERROR = "error"  # the file cannot be read as DICOM: never sent


#: When items disagree, the overall status is the first of these that occurs.
_PRECEDENCE = (
    SendStatus.REFUSED,
    SendStatus.REJECTED,
    SendStatus.ABORTED,
    SendStatus.TIMED_OUT,
    SendStatus.FAILURE,
    SendStatus.NO_CONTEXT,
    SendStatus.ERROR,
    SendStatus.WARNING,
    SendStatus.SUCCESS,
)


@dataclass(frozen=True)
class ItemResult:
    sop_instance_uid: str
    status: SendStatus
    status_code: int | None  # (0000,0900) Status from the C-STORE-RSP, None when not sent
    path: Path


@dataclass
class SendResult:
    status: SendStatus
    reason: str
    items: list[ItemResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every instance was stored (warnings included)."""
        return self.status in (SendStatus.SUCCESS, SendStatus.WARNING)


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax: UID
    offset: int  # where the data set starts, after the File Meta


def classify(code: int) -> SendStatus:
    """Map a C-STORE-RSP Status to SUCCESS/WARNING/FAILURE (PS3.7 Annex C, PS3.4 B.2.3)."""
    if code == 0x0000:
        return SendStatus.SUCCESS
    if code in (0x0001, 0x0107, 0x0116) or code >> 12 == 0xB:
        return SendStatus.WARNING
    return SendStatus.FAILURE


def _read_meta(path: Path) -> _File:
    """The UIDs needed to negotiate and send ``path``, from its File Meta (PS3.10 §7.1)."""
    meta, offset = split_dataset(path)
    sop_class = meta.get("MediaStorageSOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID")
    syntax = meta.get("TransferSyntaxUID")
    if not (sop_class and sop_instance and syntax):
        raise InvalidDicomError("no File Meta Information with the SOP and transfer syntax UIDs")
    return _File(path, UID(sop_class), UID(sop_instance), UID(syntax), offset)


def _contexts(files: Sequence[_File]) -> list[PresentationContext]:
    """One context per (SOP class, file syntax) plus one per SOP class with the fallbacks.

    The file's own syntax gets a context of its own, so a peer that prefers another
    uncompressed syntax still accepts it and the file can be streamed as it is.
    """
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for item in files:
        for syntaxes in ((item.transfer_syntax,), FALLBACK_SYNTAXES):
            key = (str(item.sop_class_uid), tuple(map(str, syntaxes)))
            if key not in seen:
                seen.add(key)
                contexts.append(build_context(item.sop_class_uid, list(syntaxes)))
    return contexts[:MAX_CONTEXTS]


class _Socket(AssociationSocket):
    """An association socket with ``TCP_NODELAY`` that pynetdicom's network thread can lend.

    pynetdicom's DUL thread polls :attr:`ready` before every read. While the socket is lent
    (:meth:`lent`), that poll parks the thread instead, so the DUL neither reads nor writes
    and the borrower owns the connection. This is the whole fast-path hook: it changes no
    pynetdicom code, and the state machine is exactly where it was when the loan ends.
    """

    def __init__(self, assoc: Association, address: AddressInformation) -> None:
        super().__init__(assoc, address=address)
        self._lend = threading.Event()
        self._parked = threading.Event()
        self._resume = threading.Event()

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = super()._create_socket(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    @property
    def ready(self) -> bool:
        """Data to read (pynetdicom's test); parks the DUL thread while the socket is lent."""
        if self._lend.is_set():
            self._parked.set()
            self._resume.wait()
            self._resume.clear()
            self._parked.clear()
            return False
        return bool(super().ready)

    @contextmanager
    def lent(self) -> Iterator[socket.socket | None]:
        """The connected socket while the DUL thread is parked; None if that thread ended."""
        self._lend.set()
        try:
            dul = self.assoc.dul
            while not self._parked.wait(0.01):
                if not dul.is_alive() or self.socket is None:
                    yield None
                    return
            yield self.socket
        finally:
            self._lend.clear()
            self._resume.set()


class _AE(AE):
    """An AE whose associations use :class:`_Socket`."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = _Socket(assoc, address)
        sock.tls_args = tls_args
        return sock


def _tls_args(destination: PacsConfig) -> tuple[ssl.SSLContext, str] | None:
    """Client TLS context (PS3.15 Annex B.1) when a CA or client certificate is configured."""
    if not (destination.tls_ca or destination.tls_cert):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=destination.tls_ca or None)
    if destination.tls_cert:
        context.load_cert_chain(destination.tls_cert, destination.tls_key or None)
    return context, destination.host


class _Watch:
    """Records who ended the association first: the peer, or us after a timeout."""

    def __init__(self) -> None:
        self.connected = False
        self.ended_by: str | None = None  # "peer" or "local"

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self._open),
            (evt.EVT_PDU_RECV, self._pdu),
            (evt.EVT_CONN_CLOSE, self._peer),
            (evt.EVT_ABORTED, self._local),
        ]

    def _open(self, event: evt.Event) -> None:
        self.connected = True

    def _pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, A_ABORT_RQ):
            self._peer(event)

    def _peer(self, event: evt.Event) -> None:
        self.ended_by = self.ended_by or "peer"

    def _local(self, event: evt.Event) -> None:
        self.ended_by = self.ended_by or "local"


def send_files(destination: PacsConfig, paths: Sequence[Path]) -> SendResult:
    """C-STORE ``paths`` to ``destination`` over one association (PS3.4 Annex B).

    Makes exactly one association attempt and never retries. Unreadable files get
    :attr:`SendStatus.ERROR` and are not sent; the others still are.
    """
    target = f"{destination.ae_title}@{destination.host}:{destination.port}"
    items: list[ItemResult] = []
    files: list[_File] = []
    for path in map(Path, paths):
        try:
            files.append(_read_meta(path))
        except (OSError, InvalidDicomError, ValueError, KeyError, AttributeError) as exc:
            logger.error("not sending %s: unreadable DICOM file (%s)", path, type(exc).__name__)
            items.append(ItemResult("", SendStatus.ERROR, None, path))
    if not files:
        if items:
            return SendResult(SendStatus.ERROR, "no readable DICOM file to send", items)
        return SendResult(SendStatus.SUCCESS, "nothing to send", items)
    try:
        tls = _tls_args(destination)
    except (OSError, ssl.SSLError) as exc:
        return _unsent(SendStatus.ERROR, f"cannot load the TLS files: {exc}", files, items)

    ae = _AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_seconds
    ae.connection_timeout = destination.timeout_seconds
    watch = _Watch()
    logger.info(
        "sending %d instance(s) to %s from %s",
        len(files),
        target,
        destination.calling_ae_title,
    )
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=_contexts(files),
            ae_title=destination.ae_title,
            max_pdu=MAX_PDU,
            tls_args=tls,
            evt_handlers=watch.handlers(),
        )
        if not assoc.is_established:
            status, reason = _failed_association(assoc, watch, destination)
            logger.error("association with %s failed: %s", target, reason)
            return _unsent(status, reason, files, items)
        try:
            ended = _send_all(assoc, files, items, destination.timeout_seconds)
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        ae.shutdown()
    if ended is not None:
        logger.error("association with %s ended early: %s", target, ended[1])
        sent = {item.path for item in items}
        return _unsent(*ended, [f for f in files if f.path not in sent], items)
    return _summary(items, target)


def _failed_association(
    assoc: Association, watch: _Watch, destination: PacsConfig
) -> tuple[SendStatus, str]:
    """Why ``assoc`` was not established (PS3.8 §7.1)."""
    timeout = destination.timeout_seconds
    tls = bool(destination.tls_ca or destination.tls_cert)
    if not watch.connected:
        where = f"{destination.host}:{destination.port}"
        why = "refused, unreachable or TLS handshake failed" if tls else "refused or unreachable"
        return SendStatus.REFUSED, f"cannot connect to {where} ({why})"
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None:
        return (
            SendStatus.REJECTED,
            f"association rejected ({rsp.result_str}) by {rsp.source_str}: {rsp.reason_str}",
        )
    if rsp is not None and rsp.result == 0x00:
        return SendStatus.NO_CONTEXT, "the peer accepted none of the presentation contexts"
    if watch.ended_by == "peer":
        return SendStatus.ABORTED, "the peer aborted the association request"
    return SendStatus.TIMED_OUT, f"no answer to the association request within {timeout:g} s"


def _usable_context(assoc: Association, item: _File) -> PresentationContext | None:
    """An accepted context for ``item``: its own syntax, else an uncompressed one."""
    best = None
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != item.sop_class_uid:
            continue
        syntax = cx.transfer_syntax[0]
        if syntax == item.transfer_syntax:
            return cx
        if not item.transfer_syntax.is_compressed and not item.transfer_syntax.is_deflated:
            best = cx
    return best


class _Ended(Exception):
    """The association cannot go on: the outcome for this and every later instance."""

    def __init__(self, status: SendStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@contextmanager
def _exclusive(assoc: Association) -> Iterator[socket.socket | None]:
    """The association's socket, with both pynetdicom threads kept off it.

    The association thread is paused with the same handshake pynetdicom's own ``send_*()``
    methods use (``_reactor_checkpoint`` / ``_is_paused``), so it neither takes DIMSE
    messages nor checks its idle timer; the DUL thread is parked by :class:`_Socket`.
    On exit both resume, in the same state as after a pynetdicom ``send_c_store()``.
    """
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused and assoc.is_alive():
            time.sleep(0.0001)
        with cast(_Socket, assoc.dul.socket).lent() as sock:
            yield sock
    finally:
        assoc._reactor_checkpoint.set()


def _send_all(
    assoc: Association, files: Sequence[_File], items: list[ItemResult], timeout: float
) -> tuple[SendStatus, str] | None:
    """Send each file in turn; return the association outcome if it ends early.

    pynetdicom negotiated the association and will release or abort it; in between, each
    C-STORE (PS3.7 §9.3.1) is built with pynetdicom's DIMSE and PDU classes but written to
    and read from the socket by this thread, one request at a time (no asynchronous
    operations window is assumed, PS3.7 D.3.3.3). That avoids two thread hand-offs and the
    network thread's polling per PDU, which cost 2-5 times storescu's time per instance.
    """
    max_pdu = int(assoc.acceptor.maximum_length or 0)  # PS3.8 D.1: the peer's limit
    ended: _Ended | None = None
    with _exclusive(assoc) as sock:
        if sock is None or not assoc.is_established:
            ended = _Ended(SendStatus.ABORTED, "association ended by the peer before sending")
        else:
            previous = sock.gettimeout()
            sock.settimeout(timeout)
            try:
                _store_each(sock, assoc, files, items, max_pdu)
            except _Ended as exc:
                ended = exc
            finally:
                sock.settimeout(previous)
    if ended is None:
        return None
    assoc.abort()  # PS3.8 §7.3.1: an A-ABORT ends an association that cannot go on
    return ended.status, ended.reason


def _store_each(
    sock: socket.socket,
    assoc: Association,
    files: Sequence[_File],
    items: list[ItemResult],
    max_pdu: int,
) -> None:
    """C-STORE ``files`` on ``sock`` and add their results to ``items``; raise :class:`_Ended`."""
    for index, item in enumerate(files, start=1):
        uid = item.sop_instance_uid
        context = _usable_context(assoc, item)
        if context is None:
            logger.warning("no accepted presentation context for %s (%s)", uid, item.sop_class_uid)
            items.append(ItemResult(uid, SendStatus.NO_CONTEXT, None, item.path))
            continue
        msg_id = index % 65536
        command = _store_command(item.sop_class_uid, uid, msg_id)
        try:
            with _data_set(item, context) as data:
                _write(sock, command, data, int(cast(int, context.context_id)), max_pdu, uid)
        except (_Unsent, OSError, InvalidDicomError, ValueError, AttributeError) as exc:
            logger.error("cannot send %s: %s", uid, type(exc).__name__)  # nothing sent yet
            items.append(ItemResult(uid, SendStatus.ERROR, None, item.path))
            continue
        code = _read_status(sock, msg_id, uid)
        status = classify(code)
        log = logger.debug if status is SendStatus.SUCCESS else logger.warning
        log("C-STORE %s: status 0x%04X (%s)", uid, code, status.value)
        items.append(ItemResult(uid, status, code, item.path))


class _Unsent(Exception):
    """The file could not be read before any of it was sent: only this instance fails."""


def _store_command(sop_class: str, sop_instance: str, msg_id: int) -> bytes:
    """The C-STORE-RQ Command Set (PS3.7 §9.3.1.1), Implicit VR Little Endian (PS3.7 §6.3.1).

    The same bytes pynetdicom's ``C_STORE_RQ`` encodes (a test compares them), without
    building pydicom datasets per instance, which costs more than the transfer itself.
    """

    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0x0000, tag, len(value)) + value

    def uid(value: str) -> bytes:
        data = value.encode("ascii")
        return data + b"\0" * (len(data) % 2)  # PS3.5 §9.1: UIDs padded with NULL

    body = b"".join(
        (
            element(0x0002, uid(sop_class)),  # Affected SOP Class UID
            element(0x0100, struct.pack("<H", 0x0001)),  # Command Field: C-STORE-RQ
            element(0x0110, struct.pack("<H", msg_id)),  # Message ID
            element(0x0700, struct.pack("<H", 0x0002)),  # Priority: LOW, pynetdicom's default
            element(0x0800, struct.pack("<H", 0x0001)),  # Command Data Set Type: present
            element(0x1000, uid(sop_instance)),  # Affected SOP Instance UID
        )
    )
    return element(0x0000, struct.pack("<L", len(body))) + body  # Command Group Length


def _command_elements(data: bytes) -> dict[int, bytes]:
    """The elements of a Command Set (all group 0000, Implicit VR Little Endian)."""
    elements: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(data):
        _, tag, length = struct.unpack_from("<HHL", data, position)
        position += 8
        elements[tag] = data[position : position + length]
        position += length
    return elements


def _data_set(item: _File, context: PresentationContext) -> BinaryIO:
    """``item``'s data set in ``context``'s transfer syntax, positioned at its start: the
    file itself after its File Meta when already in that syntax (streamed, never decoded),
    else re-encoded between uncompressed syntaxes (see :func:`_usable_context`)."""
    syntax = context.transfer_syntax[0]
    if syntax == item.transfer_syntax:
        stream = item.path.open("rb")
        stream.seek(item.offset)
        return stream
    data = encode(dcmread(item.path), syntax.is_implicit_VR, syntax.is_little_endian)
    if data is None:
        raise ValueError("cannot encode the data set")
    return BytesIO(data)


#: Bytes of P-DATA-TF PDUs gathered before one ``sendall``; also the fragment size when the
#: peer sets no maximum PDU length.
_WRITE_BATCH = 1 << 20


def _pdu(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """A P-DATA-TF PDU with one PDV (PS3.8 §9.3.5, Annex E.2)."""
    size = len(fragment)
    return struct.pack(">BBLLBB", 0x04, 0, size + 6, size + 2, context_id, control) + fragment


def _write(
    sock: socket.socket,
    command: bytes,
    data: BinaryIO,
    context_id: int,
    max_pdu: int,
    uid: str,
) -> None:
    """Send a DIMSE message (PS3.7 §8.1) in P-DATA-TF PDUs no longer than the peer's
    maximum (PS3.8 §9.3.5, D.1): the Command Set, then the data set read from ``data``."""
    fragment = max_pdu - 6 if max_pdu else _WRITE_BATCH  # PDV header: length, ID, control
    block_size = max(1, _WRITE_BATCH // fragment) * fragment
    batch = [_pdu(context_id, 0x03, command)]  # PS3.8 E.2: Command Set, last fragment
    size = len(batch[0])
    sent = False
    following = b""
    try:
        block = data.read(block_size)
        while True:
            following = data.read(block_size) if len(block) == block_size else b""
            view = memoryview(block)
            for start in range(0, max(len(view), 1), fragment):
                last = not following and start + fragment >= len(view)
                control = 0x02 if last else 0x00  # data set fragment, last or not
                batch.append(_pdu(context_id, control, view[start : start + fragment]))
                size += len(batch[-1])
            if size >= _WRITE_BATCH or not following:
                _send(sock, b"".join(batch), uid)
                batch, size, sent = [], 0, True
            if not following:
                return
            block = following
    except OSError as exc:  # reading the file; _send raises _Ended
        if not sent:
            raise _Unsent(type(exc).__name__) from exc
        raise _Ended(SendStatus.ABORTED, f"{uid} became unreadable while sending it") from exc


def _send(sock: socket.socket, data: bytes, uid: str) -> None:
    try:
        sock.sendall(data)
    except TimeoutError:
        raise _Ended(SendStatus.TIMED_OUT, f"the peer stopped reading {uid}") from None
    except OSError as exc:
        reason = f"connection lost while sending {uid} ({type(exc).__name__})"
        raise _Ended(SendStatus.ABORTED, reason) from None


def _read_status(sock: socket.socket, msg_id: int, uid: str) -> int:
    """The Status of the C-STORE-RSP to ``msg_id`` (PS3.7 §9.3.1.2)."""
    command = bytearray()
    complete = False
    while not complete:
        try:
            pdu_type, pdu = _read_pdu(sock)
        except TimeoutError:
            raise _Ended(SendStatus.TIMED_OUT, f"no C-STORE response for {uid}") from None
        except OSError as exc:
            reason = f"connection lost waiting for the response to {uid} ({type(exc).__name__})"
            raise _Ended(SendStatus.ABORTED, reason) from None
        if pdu_type == 0x07:  # A-ABORT (PS3.8 §9.3.8)
            raise _Ended(SendStatus.ABORTED, f"association aborted by the peer while sending {uid}")
        if pdu_type != 0x04:  # only a P-DATA-TF may come now (PS3.8 Table 9-10)
            raise _Ended(SendStatus.ABORTED, f"unexpected PDU type 0x{pdu_type:02X} after {uid}")
        position = 6
        while position + 6 <= len(pdu):  # PDV items (PS3.8 §9.3.5.1)
            length, _, control = struct.unpack_from(">LBB", pdu, position)
            if control & 0x01:  # a Command Set fragment; a C-STORE-RSP has no data set
                command += pdu[position + 6 : position + 4 + length]
                complete = complete or bool(control & 0x02)
            position += 4 + length
    fields = _command_elements(bytes(command))
    values = [fields.get(tag, b"") for tag in (0x0100, 0x0120, 0x0900)]
    if any(len(value) != 2 for value in values):
        raise _Ended(SendStatus.ABORTED, f"invalid C-STORE response for {uid}")
    field, responding_to, status = struct.unpack("<HHH", b"".join(values))
    if (field, responding_to) != (0x8001, msg_id):  # a C-STORE-RSP to our Message ID
        raise _Ended(SendStatus.ABORTED, f"unexpected response while sending {uid}")
    return int(status)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One whole PDU: its type and its bytes (PS3.8 §9.3.1)."""
    header = _read_exactly(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, header + _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        count = sock.recv_into(view)
        if not count:
            raise ConnectionResetError("the peer closed the connection")
        view = view[count:]
    return bytes(buffer)


def _unsent(
    status: SendStatus, reason: str, files: Sequence[_File], items: list[ItemResult]
) -> SendResult:
    """``status`` for every file not sent yet, after the ``items`` already decided."""
    rest = [ItemResult(f.sop_instance_uid, status, None, f.path) for f in files]
    return SendResult(status, reason, [*items, *rest])


def _summary(items: list[ItemResult], target: str) -> SendResult:
    counts = {s: sum(1 for i in items if i.status is s) for s in _PRECEDENCE}
    status = next(s for s in _PRECEDENCE if counts[s])
    detail = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    reason = f"{len(items)} instance(s) to {target}: {detail}"
    logger.info("send finished: %s", reason)
    return SendResult(status, reason, items)
