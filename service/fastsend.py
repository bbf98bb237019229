"""The fast C-STORE data path: every use of pynetdicom's private internals lives here.

pynetdicom negotiates, releases and aborts the association; in between, the C-STOREs go
straight over its socket from the sending thread. pynetdicom's per-PDU hand-offs between
its threads, its polling loops and its pydicom-built DIMSE messages cost 2-6 times dcmtk's
``storescu`` time per instance. Files are streamed from disk when the peer accepts their
own transfer syntax, fragmented to the peer's maximum PDU length, and there is one request
in flight at a time (no asynchronous operations window is assumed, PS3.7 D.3.3.3).

This relies on internals of pynetdicom that are not part of its API (``_reactor_checkpoint``,
``_is_paused``, the ``AssociationSocket.ready`` poll, ``AE._create_socket``), so it is used
only when ``pynetdicom.__version__`` is exactly :data:`VERIFIED_VERSION`, the version it
was checked against; :mod:`service.sender` otherwise takes the public path
(``Association.send_c_store``). Both give the same outcome values.

API used by :mod:`service.sender`: :func:`available`, :func:`make_ae`, :func:`channel`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from io import BytesIO
from typing import BinaryIO, cast

import pynetdicom
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket

from service.sender import Ended, SendStatus, StoreFile, Unsent

logger = logging.getLogger(__name__)

#: The only pynetdicom version whose internals this module was verified against.
VERIFIED_VERSION = "3.0.4"


def installed_version() -> str:
    return str(pynetdicom.__version__)


def available() -> bool:
    """True when the installed pynetdicom is the exact version this module was checked with."""
    return installed_version() == VERIFIED_VERSION


class _Socket(AssociationSocket):
    """An association socket that pynetdicom's network (DUL) thread can lend.

    pynetdicom's DUL thread polls :attr:`ready` before every read. While the socket is lent
    (:meth:`lent`), that poll parks the thread instead, so the DUL neither reads nor writes
    and the borrower owns the connection. It changes no pynetdicom code, and the state
    machine is exactly where it was when the loan ends.
    """

    def __init__(self, assoc: Association, address: AddressInformation) -> None:
        super().__init__(assoc, address=address)
        self._lend = threading.Event()
        self._parked = threading.Event()
        self._resume = threading.Event()

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


def make_ae(ae_title: str) -> AE:
    """An AE for :func:`channel`'s associations."""
    return _AE(ae_title=ae_title)


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


class FastChannel:
    """C-STOREs written to and read from the association's socket by the calling thread."""

    def __init__(self, sock: socket.socket, max_pdu: int) -> None:
        self._sock = sock
        self._max_pdu = max_pdu

    def store(self, item: StoreFile, context: PresentationContext, msg_id: int) -> int:
        """C-STORE ``item`` (PS3.7 §9.3.1) and return the response's Status.

        Raises :class:`Unsent` when the file cannot be read before any of it was sent,
        :class:`Ended` when the association cannot go on.
        """
        uid = item.sop_instance_uid
        command = store_command(item.sop_class_uid, uid, msg_id)
        try:
            with _data_set(item, context) as data:
                _write(self._sock, command, data, int(cast(int, context.context_id)),
                       self._max_pdu, uid)  # fmt: skip
        except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:  # nothing sent
            raise Unsent(type(exc).__name__) from exc
        return _read_status(self._sock, msg_id, uid)


@contextmanager
def channel(assoc: Association, timeout: float, watch: object = None) -> Iterator[FastChannel]:
    """A :class:`FastChannel` on ``assoc``'s socket, pynetdicom's threads parked meanwhile.

    ``timeout`` bounds each socket read and write (``watch`` is unused: the public
    path's signature). Raises :class:`Ended` when the
    association ended before the socket could be taken.
    """
    max_pdu = int(assoc.acceptor.maximum_length or 0)  # PS3.8 D.1: the peer's limit
    with _exclusive(assoc) as sock:
        if sock is None or not assoc.is_established:
            raise Ended(SendStatus.ABORTED, "association ended by the peer before sending")
        previous = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            yield FastChannel(sock, max_pdu)
        finally:
            with suppress(OSError):  # closed meanwhile
                sock.settimeout(previous)


def store_command(sop_class: str, sop_instance: str, msg_id: int) -> bytes:
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


def _data_set(item: StoreFile, context: PresentationContext) -> BinaryIO:
    """``item``'s data set in ``context``'s transfer syntax, positioned at its start: the
    file itself after its File Meta when already in that syntax (streamed, never decoded),
    else re-encoded between uncompressed syntaxes (PS3.5 §10.1)."""
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


class _ReadFailed(Exception):
    """The file could not be read after part of it was sent."""


def _write(
    sock: socket.socket,
    command: bytes,
    data: BinaryIO,
    context_id: int,
    max_pdu: int,
    uid: str,
) -> None:
    """Send a DIMSE message (PS3.7 §8.1) in P-DATA-TF PDUs no longer than the peer's
    maximum (PS3.8 §9.3.5, D.1): the Command Set, then the data set read from ``data``.

    Raises OSError when the file cannot be read before anything was sent, :class:`Ended`
    after (or when the connection fails)."""
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
    except OSError as exc:  # reading the file; _send raises Ended
        if not sent:
            raise
        raise Ended(SendStatus.ABORTED, f"{uid} became unreadable while sending it") from exc


def _send(sock: socket.socket, data: bytes, uid: str) -> None:
    try:
        sock.sendall(data)
    except TimeoutError:
        raise Ended(SendStatus.TIMED_OUT, f"the peer stopped reading {uid}") from None
    except OSError as exc:
        reason = f"connection lost while sending {uid} ({type(exc).__name__})"
        raise Ended(SendStatus.ABORTED, reason) from None


def _read_status(sock: socket.socket, msg_id: int, uid: str) -> int:
    """The Status of the C-STORE-RSP to ``msg_id`` (PS3.7 §9.3.1.2)."""
    command = bytearray()
    complete = False
    while not complete:
        try:
            pdu_type, pdu = _read_pdu(sock)
        except TimeoutError:
            raise Ended(SendStatus.TIMED_OUT, f"no C-STORE response for {uid}") from None
        except OSError as exc:
            reason = f"connection lost waiting for the response to {uid} ({type(exc).__name__})"
            raise Ended(SendStatus.ABORTED, reason) from None
        if pdu_type == 0x07:  # A-ABORT (PS3.8 §9.3.8)
            raise Ended(SendStatus.ABORTED, f"association aborted by the peer while sending {uid}")
        if pdu_type != 0x04:  # only a P-DATA-TF may come now (PS3.8 Table 9-10)
            raise Ended(SendStatus.ABORTED, f"unexpected PDU type 0x{pdu_type:02X} after {uid}")
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
        raise Ended(SendStatus.ABORTED, f"invalid C-STORE response for {uid}")
    field, responding_to, status = struct.unpack("<HHH", b"".join(values))
    if (field, responding_to) != (0x8001, msg_id):  # a C-STORE-RSP to our Message ID
        raise Ended(SendStatus.ABORTED, f"unexpected response while sending {uid}")
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
