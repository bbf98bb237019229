"""Send DICOM files to a DICOMweb destination with STOW-RS (PS3.18 §10.5).

One call, one HTTP request, no retry, like :func:`service.sender.send_files`, and the same
outcome values (:class:`SendResult` / :class:`ItemResult`), never exceptions:

* ``POST {url}/studies`` with ``Content-Type: multipart/related; type="application/dicom"``,
  one part per file, streamed from the files (a generator, with a Content-Length computed
  from their sizes: no file is held in memory whole, no chunked encoding needed);
* HTTP Basic (``username``/``password``) or Bearer (``token``) authentication; the
  credentials are never logged;
* the Store Instances Response (PS3.18 §10.5.3, ``application/dicom+json``): 200 every
  instance stored; 202 some failed; 409 every instance failed. Instances in the Referenced
  SOP Sequence (0008,1199) are SUCCESS (WARNING with a Warning Reason (0008,1196)); those
  in the Failed SOP Sequence (0008,1198) FAILURE, with their Failure Reason (0008,1197) as
  ``status_code`` (their meaning in the result's reason, as for C-STORE statuses:
  ``0xA700 Refused: Out of Resources``). Any other HTTP status
  fails every instance, the status in the reason;
* nothing listening (or no route / no such host) -> REFUSED, so is a server whose
  certificate ``tls_ca`` does not verify (the reason says so); the whole request (connect,
  upload, response) is bounded by ``timeout_seconds`` -> TIMED_OUT; ``SendHandle.cancel``
  -> INTERRUPTED; a connection dropped before the response -> ABORTED.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import ssl
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from service.config import PacsConfig
from service.sender import (
    INTERRUPTED_REASON,
    ItemResult,
    SendHandle,
    SendResult,
    SendStatus,
    StoreFile,
    _Guard,
    _summary,
    _unsent,
    read_files,
    status_text,
)

logger = logging.getLogger(__name__)

#: Bytes read from a file at a time while streaming the request body.
CHUNK = 1 << 20
#: The most of an error response body read back for the reason (never the whole of it).
MAX_ERROR_BODY = 64 * 1024
#: The most of a Store Instances Response read.
MAX_RESPONSE = 64 * 1024 * 1024

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


def _part_head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


def _body(files: Sequence[StoreFile], boundary: str) -> Iterator[bytes]:
    """The multipart/related body, read from the files a chunk at a time."""
    for item in files:
        yield _part_head(boundary)
        with open(item.path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def _body_length(files: Sequence[StoreFile], boundary: str) -> int:
    head = len(_part_head(boundary))
    size = sum(head + os.stat(item.path).st_size + 2 for item in files)
    return size + len(f"--{boundary}--\r\n")


def _headers(destination: PacsConfig, boundary: str, length: int) -> dict[str, str]:
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": "application/dicom+json",
    }
    if destination.token:
        headers["Authorization"] = f"Bearer {destination.token}"
    elif destination.username:
        pair = f"{destination.username}:{destination.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    return headers


def _connection(destination: PacsConfig) -> tuple[http.client.HTTPConnection, str]:
    """An unconnected connection to the destination, and the request path."""
    parts = urllib.parse.urlsplit(destination.url)
    host = parts.hostname or ""
    timeout = destination.timeout_seconds
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=destination.tls_ca or None)
        if destination.tls_cert:
            context.load_cert_chain(destination.tls_cert, destination.tls_key or None)
        connection = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    return connection, f"{parts.path.rstrip('/')}/studies"


def send_files_stow(
    destination: PacsConfig, paths: Sequence[Path], handle: SendHandle | None = None
) -> SendResult:
    """STOW-RS ``paths`` to ``destination.url`` in one request (see the module)."""
    target = destination.url
    read = read_files(paths)
    if isinstance(read, SendResult):
        return read
    files, items = read
    boundary = uuid.uuid4().hex
    try:
        connection, request_path = _connection(destination)
    except (OSError, ssl.SSLError) as exc:
        return _unsent(SendStatus.ERROR, f"cannot prepare the request: {exc}", files, items)
    guard = _Guard(destination.timeout_seconds, "STOW-RS request")
    if handle is not None and not handle._attach(guard):
        logger.warning("not sending to %s: %s", target, INTERRUPTED_REASON)
        return _unsent(SendStatus.INTERRUPTED, INTERRUPTED_REASON, files, items)
    logger.info("sending %d instance(s) to %s with STOW-RS", len(files), target)
    guard.start()
    try:
        ended, response = _exchange(connection, request_path, destination, files, boundary, guard)
    finally:
        outcome = guard.finish()
        if handle is not None:
            handle._detach()
        connection.close()
    if outcome is not None:
        status, why = outcome
        ended = status, f"{why} while {guard.stage}"
    if ended is not None or response is None:
        status, reason = ended or (SendStatus.ABORTED, "no response")
        logger.error("STOW-RS to %s failed: %s", target, reason)
        return _unsent(status, reason, files, items)
    return _outcome(response, files, items, target)


def _exchange(
    connection: http.client.HTTPConnection,
    request_path: str,
    destination: PacsConfig,
    files: Sequence[StoreFile],
    boundary: str,
    guard: _Guard,
) -> tuple[tuple[SendStatus, str] | None, tuple[int, bytes] | None]:
    """Connect, send, read the answer: ``(ended, None)`` or ``(None, (status, body))``."""
    try:
        connection.connect()
    except TimeoutError:
        return (SendStatus.TIMED_OUT, "connect timed out"), None
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message or exc.reason or "verification failed"
        return (
            SendStatus.REFUSED,
            f"TLS handshake failed: the server's certificate does not verify ({why}):"
            " is tls_ca the CA that signed it?",
        ), None
    except ssl.SSLError as exc:
        return (SendStatus.REFUSED, f"TLS handshake failed: {exc.reason or exc}"), None
    except OSError as exc:  # refused, unreachable, no such host
        return (SendStatus.REFUSED, f"cannot connect: {exc.strerror or exc}"), None
    if connection.sock is not None:
        guard.attach(connection.sock)
    guard.stage = "sending"
    try:
        headers = _headers(destination, boundary, _body_length(files, boundary))
    except OSError as exc:
        return (SendStatus.ERROR, f"cannot read a file to send: {exc.strerror}"), None
    try:
        connection.request("POST", request_path, body=_body(files, boundary), headers=headers)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may have answered early (e.g. 401): read what it said
    except OSError as exc:
        return (SendStatus.ABORTED, f"connection lost while sending: {exc}"), None
    guard.stage = "waiting for the response"
    try:
        response = connection.getresponse()
        limit = MAX_RESPONSE if response.status in (200, 202, 409) else MAX_ERROR_BODY
        body = response.read(limit)
    except (OSError, http.client.HTTPException) as exc:
        return (SendStatus.ABORTED, f"no response: {type(exc).__name__}"), None
    return None, (response.status, body)


def _values(element: Any) -> list[Any]:
    if isinstance(element, dict):
        value = element.get("Value", [])
        return value if isinstance(value, list) else []
    return []


def _first(item: Any, tag: str) -> Any:
    values = _values(item.get(tag)) if isinstance(item, dict) else []
    return values[0] if values else None


def _reason(item: Any, tag: str) -> tuple[bool, int | None]:
    """Whether ``item`` has the reason ``tag``, and its code (None when not a number)."""
    value = _first(item, tag)
    return value is not None, value if isinstance(value, int) else None


def _parse(
    body: bytes,
) -> tuple[dict[str, tuple[bool, int | None]], dict[str, int | None]]:
    """``({stored uid: (with a Warning Reason, its code)}, {failed uid: Failure Reason})``
    from the JSON answer (a code None when absent or not a number); empty when the body is
    not a DICOM JSON data set."""
    try:
        data = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return {}, {}
    if isinstance(data, list):  # some servers answer a one-element array
        data = data[0] if data else {}
    if not isinstance(data, dict):
        return {}, {}
    stored: dict[str, tuple[bool, int | None]] = {}
    for item in _values(data.get(REFERENCED_SOP_SEQUENCE)):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            stored[uid] = _reason(item, WARNING_REASON)
    failed: dict[str, int | None] = {}
    for item in _values(data.get(FAILED_SOP_SEQUENCE)):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            failed[uid] = _reason(item, FAILURE_REASON)[1]
    return stored, failed


def _outcome(
    response: tuple[int, bytes],
    files: Sequence[StoreFile],
    items: list[ItemResult],
    target: str,
) -> SendResult:
    code, body = response
    if code not in (200, 202, 409):
        reason = f"HTTP {code} from {target}"
        if code in (401, 403):
            reason += " (authentication refused: check username/password or token)"
        logger.error("STOW-RS to %s failed: %s", target, reason)
        return _unsent(SendStatus.FAILURE, reason, files, items)
    stored, failed = _parse(body)
    for item in files:
        uid = str(item.sop_instance_uid)
        if uid in failed:
            reason_code = failed[uid]
            items.append(ItemResult(uid, SendStatus.FAILURE, reason_code, item.path))
            meaning = "none given" if reason_code is None else status_text(reason_code)
            logger.warning("%s: %s not stored, failure reason %s", target, uid, meaning)
        elif uid in stored:
            warned, warning_code = stored[uid]
            status = SendStatus.WARNING if warned else SendStatus.SUCCESS
            items.append(ItemResult(uid, status, warning_code, item.path))
        elif code == 200:  # "all instances stored", even if the answer omits some
            items.append(ItemResult(uid, SendStatus.SUCCESS, None, item.path))
        else:
            items.append(ItemResult(uid, SendStatus.FAILURE, None, item.path))
    result = _summary(items, target)
    result.reason = f"HTTP {code}: {result.reason}"
    return result
