"""Send DICOM files to a PACS with C-STORE (PS3.4 Annex B, PS3.7 §9.1.1).

One call, one association attempt, no retry: the caller (the ledger) decides when to try
again. Network problems come back as :class:`SendStatus` values, never as exceptions.

Speed: files are streamed from disk without decoding when the peer accepts their own
transfer syntax, the socket has ``TCP_NODELAY`` (a C-STORE is a request/response exchange
of small PDUs that Nagle's algorithm would delay), and the PDU size is the largest the
peer accepts.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
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
#: Seconds pynetdicom's network thread sleeps when idle (its default 1 ms costs ~2 ms per
#: C-STORE round trip, half our time on loopback for small objects).
DUL_LOOP_DELAY = 0.0001


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


def classify(code: int) -> SendStatus:
    """Map a C-STORE-RSP Status to SUCCESS/WARNING/FAILURE (PS3.7 Annex C, PS3.4 B.2.3)."""
    if code == 0x0000:
        return SendStatus.SUCCESS
    if code in (0x0001, 0x0107, 0x0116) or code >> 12 == 0xB:
        return SendStatus.WARNING
    return SendStatus.FAILURE


def _read_meta(path: Path) -> _File:
    """The UIDs needed to negotiate and send ``path``, from its File Meta (PS3.10 §7.1)."""
    meta = read_file_meta_info(path)
    sop_class = meta.get("MediaStorageSOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID")
    syntax = meta.get("TransferSyntaxUID")
    if not (sop_class and sop_instance and syntax):
        raise InvalidDicomError("no File Meta Information with the SOP and transfer syntax UIDs")
    return _File(path, UID(sop_class), UID(sop_instance), UID(syntax))


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
    """An association socket with ``TCP_NODELAY`` set."""

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = super()._create_socket(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class _AE(AE):
    """An AE whose associations use :class:`_Socket` and a short network-thread sleep."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = _Socket(assoc, address=address)
        sock.tls_args = tls_args
        assoc.dul._run_loop_delay = DUL_LOOP_DELAY
        return sock


def _tls_args(destination: PacsConfig) -> tuple[ssl.SSLContext, str] | None:
    """Client TLS context (PS3.15 Annex B.1) when a CA or client certificate is configured."""
    if not (destination.tls_ca or destination.tls_cert):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=destination.tls_ca or None)
    if destination.tls_cert:
        context.load_cert_chain(destination.tls_cert, destination.tls_key or None)
    return context, destination.host


@contextmanager
def _chunked_send() -> Iterator[None]:
    """Let ``send_c_store(path)`` stream a file's bytes instead of decoding it.

    pynetdicom only reads this flag when given a path; we give a decoded dataset whenever a
    conversion is needed, so the flag never changes what is sent, only how fast.
    """
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


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
            with _chunked_send():
                ended = _send_all(assoc, files, items, watch, destination.timeout_seconds)
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
    if not watch.connected:
        where = f"{destination.host}:{destination.port}"
        return SendStatus.REFUSED, f"cannot connect to {where} (refused or unreachable)"
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


def _send_all(
    assoc: Association,
    files: Sequence[_File],
    items: list[ItemResult],
    watch: _Watch,
    timeout: float,
) -> tuple[SendStatus, str] | None:
    """Send each file in turn; return the association outcome if it ends early."""
    for index, item in enumerate(files, start=1):
        uid = item.sop_instance_uid
        context = _usable_context(assoc, item)
        if context is None:
            logger.warning("no accepted presentation context for %s (%s)", uid, item.sop_class_uid)
            items.append(ItemResult(uid, SendStatus.NO_CONTEXT, None, item.path))
            continue
        msg_id = index % 65536
        try:
            if context.transfer_syntax[0] == item.transfer_syntax:
                rsp = assoc.send_c_store(item.path, msg_id=msg_id)  # streamed, not decoded
            else:  # pynetdicom converts between uncompressed syntaxes
                rsp = assoc.send_c_store(dcmread(item.path), msg_id=msg_id)
        except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
            logger.error("cannot send %s: %s", uid, type(exc).__name__)
            items.append(ItemResult(uid, SendStatus.ERROR, None, item.path))
            continue
        if "Status" not in rsp:
            if watch.ended_by == "peer":
                return SendStatus.ABORTED, f"association aborted by the peer while sending {uid}"
            return SendStatus.TIMED_OUT, f"no C-STORE response for {uid} within {timeout:g} s"
        code = int(rsp.Status)
        status = classify(code)
        log = logger.info if status is SendStatus.SUCCESS else logger.warning
        log("C-STORE %s: status 0x%04X (%s)", uid, code, status.value)
        items.append(ItemResult(uid, status, code, item.path))
        if not assoc.is_established:
            return SendStatus.ABORTED, f"association ended by the peer after {uid}"
    return None


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
