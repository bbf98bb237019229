"""Send DICOM files to a PACS with C-STORE (PS3.4 Annex B, PS3.7 §9.1.1).

One call, one association attempt, no retry: the caller (the ledger) decides when to try
again. Network problems come back as :class:`SendStatus` values, never as exceptions.

Bounds: ``PacsConfig.timeout_seconds`` bounds the whole association (connect, negotiation,
every C-STORE, release), not one socket read. Past it the connection is closed at once
(the peer sees the transport close, which PS3.8 §7.4 treats as an A-P-ABORT) and the result
is :attr:`SendStatus.TIMED_OUT`. A :class:`SendHandle` passed to :func:`send_files` lets
another thread stop the send the same way (:attr:`SendStatus.INTERRUPTED`). Instances
answered before keep their status; the others are recorded with the association's.

Two data paths, same outcome values:

* fast (:mod:`service.fastsend`): pynetdicom negotiates, releases and aborts, and the
  C-STOREs go straight over its socket from this thread. It relies on pynetdicom internals,
  so it is used only with the exact pynetdicom version it was verified against;
* public: ``Association.send_c_store(path)`` one instance at a time, with pynetdicom's
  ``STORE_SEND_CHUNKED_DATASET`` option so files in an accepted transfer syntax are sent
  as stored, without decoding.

:data:`FAST_PATH` (or ``send_files(..., fast=...)``) picks one; ``None`` = fast when
available. Both set ``TCP_NODELAY`` (a C-STORE is a request/response exchange of small
PDUs that Nagle's algorithm would delay).
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from service.config import PacsConfig

logger = logging.getLogger(__name__)

#: PS3.8 §9.3.1 allows at most 128 presentation contexts (odd IDs 1-255) per association.
MAX_CONTEXTS = 128
#: Uncompressed transfer syntaxes every Storage SCP supports (PS3.5 §10.1), offered as fallback.
FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Our receive limit for PDUs from the peer (PS3.8 §9.3.1); 0 means unlimited.
MAX_PDU = 0
#: Which data path :func:`send_files` takes: True fast, False public, None fast if available.
FAST_PATH: bool | None = None
#: The reason of a send stopped by :meth:`SendHandle.cancel`.
INTERRUPTED_REASON = "send interrupted by a stop"


class SendStatus(enum.StrEnum):
    """Outcome of one instance (first three) or of the whole association."""

    SUCCESS = "success"
    WARNING = "warning"  # PS3.4 B.2.3: 0xB000, 0xB006, 0xB007 (stored, with changes)
    FAILURE = "failure"  # any failure status from the peer (0xA7xx, 0xA9xx, 0xCxxx...)
    REFUSED = "refused"  # no TCP connection: nothing listening or host unreachable
    REJECTED = "rejected"  # A-ASSOCIATE-RJ (PS3.8 §7.1.1.9)
    ABORTED = "aborted"  # A-ABORT / A-P-ABORT from the peer or a dropped connection
    TIMED_OUT = "timed_out"  # the association outlasted timeout_seconds
    INTERRUPTED = "interrupted"  # stopped by SendHandle.cancel (service shutdown)
    NO_CONTEXT = "no_context"  # the peer accepted no presentation context for the object
    ERROR = "error"  # the file cannot be read as DICOM: never sent


#: When items disagree, the overall status is the first of these that occurs.
_PRECEDENCE = (
    SendStatus.REFUSED,
    SendStatus.REJECTED,
    SendStatus.ABORTED,
    SendStatus.TIMED_OUT,
    SendStatus.INTERRUPTED,
    SendStatus.FAILURE,
    SendStatus.NO_CONTEXT,
    SendStatus.ERROR,
    SendStatus.WARNING,
    SendStatus.SUCCESS,
)


def status_text(code: int) -> str:
    """A storage status as ``0xA700 Refused: Out of Resources``: the meaning from the
    Storage Service Class table of PS3.4 Annex B (with the general statuses of PS3.7
    Annex C) as pynetdicom ships it; a code the table lacks as its hex alone. Serves the
    C-STORE Status (0000,0900) and the STOW-RS Failure and Warning Reasons (0008,1197),
    (0008,1196), which take their values from the same table (PS3.18 §10.5.3)."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))
    text = meaning or category
    return f"0x{code:04X} {text}" if text else f"0x{code:04X}"


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
class StoreFile:
    """What is needed to negotiate and send one file, from its File Meta (PS3.10 §7.1)."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax: UID
    offset: int  # where the data set starts, after the File Meta


class Ended(Exception):
    """The association cannot go on: the outcome for this and every later instance."""

    def __init__(self, status: SendStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Unsent(Exception):
    """The file could not be read before any of it was sent: only this instance fails."""


class Channel(Protocol):
    """Sends one C-STORE on an established association (a data path)."""

    def store(self, item: StoreFile, context: PresentationContext, msg_id: int) -> int:
        """The C-STORE-RSP Status; raises :class:`Unsent` or :class:`Ended`."""
        ...


def classify(code: int) -> SendStatus:
    """Map a C-STORE-RSP Status to SUCCESS/WARNING/FAILURE (PS3.7 Annex C, PS3.4 B.2.3)."""
    if code == 0x0000:
        return SendStatus.SUCCESS
    if code in (0x0001, 0x0107, 0x0116) or code >> 12 == 0xB:
        return SendStatus.WARNING
    return SendStatus.FAILURE


# -- deadline and cancellation -------------------------------------------------------------


def _shut(sock: socket.socket) -> None:
    """Close both directions of ``sock`` now, waking any thread blocked on it.

    The plain socket's ``shutdown`` also for TLS sockets: ``SSLSocket.shutdown`` would drop
    its SSL object under a thread still reading through it."""
    with suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Guard:
    """Ends one association at its deadline or on :meth:`SendHandle.cancel`, by closing
    its connection from outside the sending thread (which then sees it end)."""

    def __init__(self, timeout: float, what: str = "association") -> None:
        self._lock = threading.Lock()
        self._what = what
        self._sock: socket.socket | None = None
        self._finished = False
        self.outcome: tuple[SendStatus, str] | None = None
        self.stage = "connecting"  # what the sending thread is doing, for the reason
        reason = f"{what} exceeded timeout_seconds={timeout:g}"
        self._timer = threading.Timer(timeout, self.fire, (SendStatus.TIMED_OUT, reason))
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def attach(self, sock: socket.socket) -> None:
        """The association's connection, as soon as it is open."""
        with self._lock:
            self._sock = sock
            fired = self.outcome is not None
        if fired:
            _shut(sock)

    def fire(self, status: SendStatus, reason: str) -> None:
        """End the association now with ``status`` unless it has already ended."""
        with self._lock:
            if self.outcome is not None or self._finished:
                return
            self.outcome = (status, reason)
            sock = self._sock
        logger.warning("ending the %s: %s", self._what, reason)
        if sock is not None:
            _shut(sock)

    def finish(self) -> tuple[SendStatus, str] | None:
        """The association is over: disarm; the outcome if the guard ended it."""
        with self._lock:
            self._finished = True
            self._timer.cancel()
            return self.outcome


class SendHandle:
    """Stops a send from another thread (e.g. on SIGTERM): ``send_files(..., handle)``.

    :meth:`cancel` closes the open association at once and that send returns
    :attr:`SendStatus.INTERRUPTED`; a send started with an already cancelled handle
    returns INTERRUPTED without connecting. A handle stays cancelled; use one per send.
    Thread-safe; cancelling twice or after the send ended does nothing more.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._guard: _Guard | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Interrupt the send (now, or as soon as it starts)."""
        with self._lock:
            self._cancelled = True
            guard = self._guard
        if guard is not None:
            guard.fire(SendStatus.INTERRUPTED, INTERRUPTED_REASON)

    def _attach(self, guard: _Guard) -> bool:
        """Route :meth:`cancel` to ``guard``; False when already cancelled."""
        with self._lock:
            if self._cancelled:
                return False
            self._guard = guard
            return True

    def _detach(self) -> None:
        with self._lock:
            self._guard = None


# -- association -----------------------------------------------------------------------------


def read_files(paths: Sequence[Path]) -> tuple[list[StoreFile], list[ItemResult]] | SendResult:
    """What each file needs to be sent, from its File Meta; an unreadable file becomes an
    ERROR item and is not sent. The whole result when nothing is left to send."""
    items: list[ItemResult] = []
    files: list[StoreFile] = []
    for path in map(Path, paths):
        try:
            files.append(_read_meta(path))
        except (OSError, InvalidDicomError, ValueError, KeyError, AttributeError) as exc:
            logger.error("not sending %s: unreadable DICOM file (%s)", path, type(exc).__name__)
            items.append(ItemResult("", SendStatus.ERROR, None, path))
    if files:
        return files, items
    if items:
        return SendResult(SendStatus.ERROR, "no readable DICOM file to send", items)
    return SendResult(SendStatus.SUCCESS, "nothing to send", items)


def _read_meta(path: Path) -> StoreFile:
    """The UIDs needed to negotiate and send ``path``, from its File Meta (PS3.10 §7.1)."""
    meta, offset = split_dataset(path)
    sop_class = meta.get("MediaStorageSOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID")
    syntax = meta.get("TransferSyntaxUID")
    if not (sop_class and sop_instance and syntax):
        raise InvalidDicomError("no File Meta Information with the SOP and transfer syntax UIDs")
    return StoreFile(path, UID(sop_class), UID(sop_instance), UID(syntax), offset)


def _contexts(files: Sequence[StoreFile]) -> list[PresentationContext]:
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


def _tls_args(destination: PacsConfig) -> tuple[ssl.SSLContext, str] | None:
    """Client TLS context (PS3.15 Annex B.1) when a CA or client certificate is configured."""
    if not (destination.tls_ca or destination.tls_cert):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=destination.tls_ca or None)
    if destination.tls_cert:
        context.load_cert_chain(destination.tls_cert, destination.tls_key or None)
    return context, destination.host


class _Watch:
    """Records who ended the association first (the peer, or us after a timeout) and hands
    the connection to the guard once it is open."""

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
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
        transport = event.assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.guard.attach(sock)

    def _pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, A_ABORT_RQ):
            self._peer(event)

    def _peer(self, event: evt.Event) -> None:
        self.ended_by = self.ended_by or "peer"

    def _local(self, event: evt.Event) -> None:
        self.ended_by = self.ended_by or "local"


def _use_fast(fast: bool | None) -> bool:
    from service import fastsend

    choice = FAST_PATH if fast is None else fast
    if choice is None:
        return fastsend.available()
    if choice and not fastsend.available():
        raise RuntimeError(
            f"the fast send path needs pynetdicom {fastsend.VERIFIED_VERSION}, "
            f"not {fastsend.installed_version()}"
        )
    return choice


def send_files(
    destination: PacsConfig,
    paths: Sequence[Path],
    handle: SendHandle | None = None,
    *,
    fast: bool | None = None,
) -> SendResult:
    """C-STORE ``paths`` to ``destination`` over one association (PS3.4 Annex B).

    Makes exactly one association attempt and never retries; the association lasts at most
    ``destination.timeout_seconds`` (then TIMED_OUT). ``handle.cancel()`` from another
    thread ends it at once (INTERRUPTED). Unreadable files get :attr:`SendStatus.ERROR` and
    are not sent; the others still are. ``fast`` overrides :data:`FAST_PATH`.
    """
    target = f"{destination.ae_title}@{destination.host}:{destination.port}"
    read = read_files(paths)
    if isinstance(read, SendResult):
        return read
    files, items = read
    try:
        tls = _tls_args(destination)
    except (OSError, ssl.SSLError) as exc:
        return _unsent(SendStatus.ERROR, f"cannot load the TLS files: {exc}", files, items)

    guard = _Guard(destination.timeout_seconds)
    if handle is not None and not handle._attach(guard):
        logger.warning("not sending to %s: %s", target, INTERRUPTED_REASON)
        return _unsent(SendStatus.INTERRUPTED, INTERRUPTED_REASON, files, items)
    use_fast = _use_fast(fast)
    logger.info(
        "sending %d instance(s) to %s from %s",
        len(files),
        target,
        destination.calling_ae_title,
    )
    guard.start()
    try:
        ended = _associate_and_send(destination, files, items, tls, guard, use_fast)
    finally:
        outcome = guard.finish()
        if handle is not None:
            handle._detach()
    if outcome is not None:
        status, why = outcome
        answered = sum(1 for i in items if i.status_code is not None)
        reason = f"{why} while {guard.stage} ({answered} of {len(files)} instance(s) answered)"
        ended = status, reason
    if ended is not None:
        logger.error("association with %s ended early: %s", target, ended[1])
        sent = {item.path for item in items}
        return _unsent(*ended, [f for f in files if f.path not in sent], items)
    return _summary(items, target)


def _associate_and_send(
    destination: PacsConfig,
    files: Sequence[StoreFile],
    items: list[ItemResult],
    tls: tuple[ssl.SSLContext, str] | None,
    guard: _Guard,
    use_fast: bool,
) -> tuple[SendStatus, str] | None:
    """Associate, store, release; the association outcome if it ended early."""
    from service import fastsend

    timeout = destination.timeout_seconds
    ae = (
        fastsend.make_ae(destination.calling_ae_title)
        if use_fast
        else AE(ae_title=destination.calling_ae_title)
    )
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    watch = _Watch(guard)
    guard.stage = "connecting or negotiating the association"
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
            return _failed_association(assoc, watch, destination)
        try:
            opener = fastsend.channel if use_fast else _public_channel
            ended: Ended | None = None
            try:
                with opener(assoc, timeout, watch) as chan:
                    _store_each(chan, assoc, files, items, guard)
            except Ended as exc:
                ended = exc
            if ended is not None:
                assoc.abort()  # PS3.8 §7.3.1: an A-ABORT ends an association that cannot go on
                return ended.status, ended.reason
        finally:
            if assoc.is_established:
                guard.stage = "releasing the association"
                assoc.release()
    finally:
        ae.shutdown()
    return None


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


def _usable_context(assoc: Association, item: StoreFile) -> PresentationContext | None:
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


def _store_each(
    chan: Channel,
    assoc: Association,
    files: Sequence[StoreFile],
    items: list[ItemResult],
    guard: _Guard,
) -> None:
    """C-STORE ``files`` through ``chan`` and add their results to ``items``; raises
    :class:`Ended` when the association cannot go on."""
    for index, item in enumerate(files, start=1):
        guard.stage = f"sending instance {index} of {len(files)}"
        uid = item.sop_instance_uid
        context = _usable_context(assoc, item)
        if context is None:
            logger.warning("no accepted presentation context for %s (%s)", uid, item.sop_class_uid)
            items.append(ItemResult(uid, SendStatus.NO_CONTEXT, None, item.path))
            continue
        try:
            code = chan.store(item, context, index % 65536)
        except Unsent as exc:
            logger.error("cannot send %s: %s", uid, exc)  # nothing of it was sent
            items.append(ItemResult(uid, SendStatus.ERROR, None, item.path))
            continue
        status = classify(code)
        log = logger.debug if status is SendStatus.SUCCESS else logger.warning
        log("C-STORE %s: status 0x%04X (%s)", uid, code, status.value)
        items.append(ItemResult(uid, status, code, item.path))


# -- the public data path ----------------------------------------------------------------------


class _PublicChannel:
    """C-STOREs with ``Association.send_c_store``, pynetdicom's public API.

    A file whose own transfer syntax was accepted is passed as a path: with
    ``STORE_SEND_CHUNKED_DATASET`` pynetdicom sends its data set as stored, without decoding
    it. Otherwise it is decoded and pynetdicom re-encodes it between uncompressed syntaxes
    (PS3.5 §10.1)."""

    def __init__(self, assoc: Association, watch: _Watch) -> None:
        self._assoc = assoc
        self._watch = watch
        _config.STORE_SEND_CHUNKED_DATASET = True  # only affects sends given a file path

    def store(self, item: StoreFile, context: PresentationContext, msg_id: int) -> int:
        uid = item.sop_instance_uid
        dataset: Path | Dataset = item.path
        if context.transfer_syntax[0] != item.transfer_syntax:
            try:
                dataset = dcmread(item.path)
            except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
                raise Unsent(type(exc).__name__) from exc
        try:
            status = self._assoc.send_c_store(dataset, msg_id=msg_id)
        except (OSError, InvalidDicomError, ValueError, AttributeError, RuntimeError) as exc:
            if self._assoc.is_established:
                raise Unsent(type(exc).__name__) from exc
            reason = f"association ended while sending {uid} ({type(exc).__name__})"
            raise Ended(SendStatus.ABORTED, reason) from exc
        if "Status" in status:
            return int(status.Status)
        if self._watch.ended_by == "local":  # pynetdicom aborted after its DIMSE timeout
            raise Ended(SendStatus.TIMED_OUT, f"no C-STORE response for {uid}")
        raise Ended(SendStatus.ABORTED, f"association aborted by the peer while sending {uid}")


@contextmanager
def _public_channel(assoc: Association, timeout: float, watch: _Watch) -> Iterator[Channel]:
    yield _PublicChannel(assoc, watch)


# -- results -----------------------------------------------------------------------------------


def _unsent(
    status: SendStatus, reason: str, files: Sequence[StoreFile], items: list[ItemResult]
) -> SendResult:
    """``status`` for every file not sent yet, after the ``items`` already decided."""
    rest = [ItemResult(f.sop_instance_uid, status, None, f.path) for f in files]
    return SendResult(status, reason + _status_reasons(items), [*items, *rest])


def _status_reasons(items: Sequence[ItemResult]) -> str:
    """``"; failure statuses: 0xA700 Refused: Out of Resources (2), ..."`` (and the warning
    statuses) for a send's reason; "" when the peer gave none."""
    parts = []
    for status in (SendStatus.FAILURE, SendStatus.WARNING):
        counts = Counter(i.status_code for i in items if i.status is status and i.status_code)
        if counts:
            listed = ", ".join(f"{status_text(c)} ({n})" for c, n in sorted(counts.items()))
            parts.append(f"; {status.value} statuses: {listed}")
    return "".join(parts)


def _summary(items: list[ItemResult], target: str) -> SendResult:
    counts = {s: sum(1 for i in items if i.status is s) for s in _PRECEDENCE}
    status = next(s for s in _PRECEDENCE if counts[s])
    detail = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    reason = f"{len(items)} instance(s) to {target}: {detail}{_status_reasons(items)}"
    logger.info("send finished: %s", reason)
    return SendResult(status, reason, items)
