"""Operator requests (``resend``, ``reprocess``) carried out by the running service.

The CLI holds no destinations and never writes the ledger, so it does not act itself: it
writes a request file into ``STATE/requests/`` and waits for the service's answer.

Files in ``STATE/requests/`` (each written atomically: temp name, fsync, rename):

``<id>.request.json``
    written by the CLI (:func:`submit`): ``{"id", "kind", "gateway_id", "study_uid",
    "created"}``; ``kind`` is ``resend`` or ``reprocess``, ``created`` ISO 8601 UTC.
``<id>.taken.json``
    the same file, renamed by the service when it takes the request (:func:`take_requests`).
    The rename is the claim: the CLI withdraws a request by removing ``<id>.request.json``
    (:func:`withdraw`), and exactly one of the two succeeds.
``<id>.result.json``
    the service's answer (:func:`write_result`): ``{"id", "ok", "state", "message",
    "finished"}``. The CLI reads it (:func:`wait_for_result`), prints it and removes it.

Protocol for the service (the engine, on each tick)::

    for request in take_requests(state_dir):
        ...carry it out...
        write_result(state_dir, request, ok, state, message)

and once at start, :func:`fail_interrupted` answers the requests a previous service took
but never answered (it stopped meanwhile): they are not carried out again on their own.
Results nobody collected are removed after :data:`RESULT_KEEP_SECONDS`.

A file named ``<gateway_id>__<study_uid>`` (written by older versions'
``request_reprocess``) is taken as a reprocess request with no one waiting for its result.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.config import GATEWAY_ID_RE
from service.fsutil import TMP_PREFIX, atomic_write, safe_name

logger = logging.getLogger(__name__)

REQUESTS_DIR = "requests"
KINDS = ("resend", "reprocess")
REQUEST_SUFFIX = ".request.json"
TAKEN_SUFFIX = ".taken.json"
RESULT_SUFFIX = ".result.json"
#: A result no CLI collected (it stopped waiting) is removed after this long.
RESULT_KEEP_SECONDS = 3600.0
#: How often :func:`wait_for_result` looks for the answer.
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Request:
    """One operator request. ``request_id`` is "" for an old-style reprocess file."""

    request_id: str
    kind: str  # one of KINDS
    gateway_id: str
    study_uid: str
    created: str  # ISO 8601 UTC

    @property
    def answerable(self) -> bool:
        """Whether someone may wait for a result (not an old-style request file)."""
        return bool(self.request_id)


@dataclass(frozen=True)
class Result:
    """The service's answer to a request."""

    request_id: str
    ok: bool
    state: str
    message: str
    finished: str  # ISO 8601 UTC


def requests_dir(state_dir: Path) -> Path:
    return state_dir / REQUESTS_DIR


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    payload = (json.dumps(data, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(payload))


def validate(kind: str, gateway_id: str, study_uid: str) -> str:
    """Why a request is malformed ("" when it is well formed)."""
    if kind not in KINDS:
        return f"unknown request kind {kind!r} (known: {', '.join(KINDS)})"
    if not GATEWAY_ID_RE.match(gateway_id):
        return f"not a valid gateway id: {gateway_id!r}"
    if safe_name(study_uid) is None:
        return "not a valid study folder name"
    return ""


# -- the CLI's side ------------------------------------------------------------------------


def submit(state_dir: Path, kind: str, gateway_id: str, study_uid: str) -> Request:
    """Write a new request (atomically) for the service to carry out; return it.

    Raises ValueError when the request is malformed (nothing is written then)."""
    problem = validate(kind, gateway_id, study_uid)
    if problem:
        raise ValueError(problem)
    request = Request(uuid.uuid4().hex, kind, gateway_id, study_uid, _now_iso())
    _write_json(
        requests_dir(state_dir) / f"{request.request_id}{REQUEST_SUFFIX}",
        {
            "id": request.request_id,
            "kind": kind,
            "gateway_id": gateway_id,
            "study_uid": study_uid,
            "created": request.created,
        },
    )
    return request


def read_result(state_dir: Path, request: Request) -> Result | None:
    """The service's answer, once written (None before, or when it cannot be read)."""
    path = requests_dir(state_dir) / f"{request.request_id}{RESULT_SUFFIX}"
    try:
        data = json.loads(path.read_text())
        return Result(
            request_id=str(data["id"]),
            ok=data["ok"] is True,
            state=str(data["state"]),
            message=str(data["message"]),
            finished=str(data["finished"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("request %s: unreadable result: %s", request.request_id, exc)
        return None


def wait_for_result(
    state_dir: Path, request: Request, timeout: float, poll: float = POLL_SECONDS
) -> Result | None:
    """Wait up to ``timeout`` seconds for the answer; remove it once read."""
    deadline = time.monotonic() + timeout
    while True:
        result = read_result(state_dir, request)
        if result is not None:
            discard(state_dir, request)
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(poll, left))


def withdraw(state_dir: Path, request: Request) -> bool:
    """Remove a request no service has taken yet; False when a service took it already."""
    try:
        (requests_dir(state_dir) / f"{request.request_id}{REQUEST_SUFFIX}").unlink()
    except FileNotFoundError:
        return False
    return True


def discard(state_dir: Path, request: Request) -> None:
    """Remove a request's files (its answer was read)."""
    for suffix in (RESULT_SUFFIX, TAKEN_SUFFIX, REQUEST_SUFFIX):
        (requests_dir(state_dir) / f"{request.request_id}{suffix}").unlink(missing_ok=True)


# -- the service's side ---------------------------------------------------------------------


def take_requests(state_dir: Path) -> list[Request]:
    """Claim every waiting request, oldest first; the caller must carry each one out and
    answer it with :func:`write_result`.

    A malformed request is answered at once (``ok`` false, state ``refused``) and not
    returned. Also removes results that nobody collected within RESULT_KEEP_SECONDS."""
    folder = requests_dir(state_dir)
    if not folder.is_dir():
        return []
    taken: list[tuple[str, Request]] = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name.startswith(TMP_PREFIX):
            continue
        if name.endswith(RESULT_SUFFIX):
            _expire(path)
        elif name.endswith(REQUEST_SUFFIX):
            request = _claim(state_dir, path, name[: -len(REQUEST_SUFFIX)])
            if request is not None:
                taken.append((request.created, request))
        elif not name.endswith(TAKEN_SUFFIX):
            legacy = _take_legacy(path)
            if legacy is not None:
                taken.append(("", legacy))
    return [request for _, request in sorted(taken, key=lambda item: item[0])]


def write_result(state_dir: Path, request: Request, ok: bool, state: str, message: str) -> None:
    """Answer a request taken with :func:`take_requests` (atomically); ``state`` is the
    outcome in a word (e.g. the study's state), ``message`` says what happened. No-op for
    an old-style request, which nobody waits for."""
    if not request.answerable:
        return
    folder = requests_dir(state_dir)
    _write_json(
        folder / f"{request.request_id}{RESULT_SUFFIX}",
        {
            "id": request.request_id,
            "ok": bool(ok),
            "state": state,
            "message": message,
            "finished": _now_iso(),
        },
    )
    (folder / f"{request.request_id}{TAKEN_SUFFIX}").unlink(missing_ok=True)
    logger.info(
        "gateway=%s study=%s %s request %s: %s%s",
        request.gateway_id,
        request.study_uid,
        request.kind,
        "done" if ok else "failed",
        state,
        f" ({message})" if message else "",
    )


def fail_interrupted(state_dir: Path) -> int:
    """At start: answer every request a previous service took but never answered (it
    stopped meanwhile) with ``ok`` false, state ``interrupted``; they are not carried out
    again. Returns how many."""
    folder = requests_dir(state_dir)
    if not folder.is_dir():
        return 0
    count = 0
    for path in sorted(folder.glob(f"*{TAKEN_SUFFIX}")):
        request_id = path.name[: -len(TAKEN_SUFFIX)]
        request = _read_request(path, request_id)
        if request is None:
            request = Request(request_id, "unknown", "", "", "")
        write_result(
            state_dir,
            request,
            False,
            "interrupted",
            "the service stopped while carrying out the request; check the study "
            "(python main.py study) and ask again if needed",
        )
        count += 1
    return count


def _read_request(path: Path, request_id: str) -> Request | None:
    try:
        data = json.loads(path.read_text())
        return Request(
            request_id,
            str(data["kind"]),
            str(data["gateway_id"]),
            str(data["study_uid"]),
            str(data["created"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _claim(state_dir: Path, path: Path, request_id: str) -> Request | None:
    taken = path.with_name(f"{request_id}{TAKEN_SUFFIX}")
    try:
        os.rename(path, taken)
    except FileNotFoundError:
        return None  # withdrawn by the CLI meanwhile
    request = _read_request(taken, request_id)
    problem = (
        "unreadable request file"
        if request is None
        else validate(request.kind, request.gateway_id, request.study_uid)
    )
    if request is None or problem:
        logger.warning("request %s refused: %s", request_id, problem)
        write_result(
            state_dir,
            request or Request(request_id, "unknown", "", "", ""),
            False,
            "refused",
            problem,
        )
        return None
    return request


def _take_legacy(path: Path) -> Request | None:
    """An old-style ``<gateway_id>__<study_uid>`` reprocess request file."""
    gateway_id, _, study_uid = path.name.partition("__")
    path.unlink(missing_ok=True)
    if validate("reprocess", gateway_id, study_uid):
        logger.warning("ignoring unknown file in the requests folder: %s", path.name)
        return None
    return Request("", "reprocess", gateway_id, study_uid, "")


def _expire(path: Path) -> None:
    try:
        if time.time() - path.stat().st_mtime > RESULT_KEEP_SECONDS:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
