"""Read-only views of the ledger shared by the CLI (``status``, ``studies``, ``study``,
``resend``, ``reprocess``) and the operator console (:mod:`service.console`): one source
for what both show and do.

Every view opens the ledger read-only (:meth:`Ledger.open_readonly`) and closes it again;
nothing here writes the ledger. Operator actions are requests the running service carries
out (:mod:`service.requests`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service import requests
from service.config import Config
from service.ledger import Ledger, StudyState
from service.sender import status_text
from service.supervision import health

logger = logging.getLogger(__name__)

#: ``status --json`` ``service`` values: no ledger yet, or a ledger the service wrote.
SERVICE_NOT_RUN, SERVICE_RAN = "not run yet", "ran"
#: Study states shown first: what needs an operator.
ATTENTION_STATES = (str(StudyState.FAILED), str(StudyState.SEND_FAILED))


class NotFound(LookupError):
    """An unknown gateway or study; the message says which."""


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-12-02T10:11:12.345Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def no_ledger(config: Config) -> str:
    return f"no ledger at {config.ledger_path}: the service has not run yet"


def top_findings(findings: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """Highest probabilities across images, from a model's findings summary."""
    best: dict[str, float] = {}
    for per_image in (findings.get("images") or {}).values():
        if isinstance(per_image, dict):
            for name, prob in per_image.items():
                if isinstance(prob, int | float):
                    best[name] = max(best.get(name, 0.0), float(prob))
    return sorted(best.items(), key=lambda kv: -kv[1])[:n]


def status_report(config: Config) -> dict[str, Any]:
    """``status --json``: ``{"service": "not run yet" | "ran", "healthy": bool,
    "health": the verdict, "ledger": path, "gateways": {id: {...}}}``.

    ``service`` is "not run yet" while there is no ledger (``gateways`` is then empty);
    ``healthy`` and ``health`` are the verdict of ``status --health``."""
    verdict = health(config.state_dir)
    report: dict[str, Any] = {
        "ledger": str(config.ledger_path),
        "healthy": verdict.ok,
        "health": verdict.message,
        "gateways": {},
    }
    ledger = Ledger.open_readonly(config.ledger_path)
    if ledger is None:
        report["service"] = SERVICE_NOT_RUN
        return report
    report["service"] = SERVICE_RAN
    now = time.time()
    try:
        for gid in ledger.gateway_ids():
            waiting = ledger.oldest_waiting_study(gid)
            report["gateways"][gid] = {
                "studies": ledger.study_counts(gid),
                "oldest_waiting": (
                    {
                        "study_uid": waiting["study_uid"],
                        "state": waiting["state"],
                        "reason": waiting.get("reason", ""),
                        "age_s": now - waiting["first_seen"],
                    }
                    if waiting
                    else None
                ),
                "last_errors": ledger.latest_events(gid, 5),
                "latest_runs": [
                    {
                        "run_id": r.run_id,
                        "study_uid": r.study_uid,
                        "model": f"{r.model_name} {r.model_version}",
                        "state": str(r.state),
                        "reason": r.reason,
                        "findings": r.findings,
                        "top_findings": top_findings(r.findings),
                    }
                    for r in ledger.runs(gid)[-5:]
                ],
            }
        return report
    finally:
        ledger.close()


def list_studies(
    config: Config, gateway_id: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    """``studies --json``: one object per study (gateway_id, study_uid, state, reason,
    first_seen, updated_at, node), ordered by gateway and last change. Raises
    :class:`NotFound` for an unknown gateway; [] while there is no ledger."""
    ledger = Ledger.open_readonly(config.ledger_path)
    if ledger is None:
        if gateway_id is not None:
            raise NotFound(f"unknown gateway {gateway_id}: {no_ledger(config)}")
        return []
    try:
        known = ledger.gateway_ids()
        if gateway_id is not None and gateway_id not in known:
            raise NotFound(f"unknown gateway {gateway_id} (known: {', '.join(known) or 'none'})")
        rows = ledger.list_studies(gateway_id, state)
    finally:
        ledger.close()
    return [
        {
            "gateway_id": r["gateway_id"],
            "study_uid": r["study_uid"],
            "state": r["state"],
            "reason": r["reason"],
            "first_seen": iso(r["first_seen"]),
            "updated_at": iso(r["updated"]),
            "node": r["node"],
        }
        for r in rows
    ]


def check_study(config: Config, gateway_id: str, study_uid: str) -> str:
    """Why ``gateway_id``/``study_uid`` is not a study the ledger knows ("" when it is)."""
    ledger = Ledger.open_readonly(config.ledger_path)
    if ledger is None:
        return f"unknown gateway {gateway_id}: {no_ledger(config)}"
    try:
        known = ledger.gateway_ids()
        if gateway_id not in known:
            return f"unknown gateway {gateway_id} (known: {', '.join(known) or 'none'})"
        if ledger.study_state(gateway_id, study_uid) is None:
            return f"gateway {gateway_id} has no study {study_uid}"
        return ""
    finally:
        ledger.close()


def study_history(config: Config, gateway_id: str, study_uid: str) -> dict[str, Any]:
    """``study --json``: :meth:`Ledger.study_history` with times as ISO 8601 UTC
    (``updated`` named ``updated_at``). Raises :class:`NotFound`."""
    problem = check_study(config, gateway_id, study_uid)
    if problem:
        raise NotFound(problem)
    ledger = Ledger.open_readonly(config.ledger_path)
    assert ledger is not None  # check_study found it
    try:
        history = ledger.study_history(gateway_id, study_uid)
    finally:
        ledger.close()
    if history is None:  # gone between the two reads: cannot happen, nothing deletes
        raise NotFound(f"gateway {gateway_id} has no study {study_uid}")
    for key in ("first_seen", "updated"):
        history[key] = iso(history[key])
    history["updated_at"] = history.pop("updated")
    for run in history["runs"]:
        run["started"], run["finished"] = iso(run["started"]), iso(run["finished"])
        for send in run["sends"]:
            send["started"], send["finished"] = iso(send["started"]), iso(send["finished"])
            for item in send["items"]:  # the status code with its meaning (PS3.4 Annex B)
                code = item["status_code"]
                item["status_text"] = "" if code is None else status_text(code)
    for event in history["events"]:
        event["ts"] = iso(event["ts"])
    return history


def output_path(config: Config, gateway_id: str, study_uid: str, sop_instance_uid: str) -> str:
    """The recorded path of one of the study's outputs ("" when the ledger has none): the
    console renders thumbnails only from files the ledger says we wrote."""
    ledger = Ledger.open_readonly(config.ledger_path)
    if ledger is None:
        return ""
    try:
        history = ledger.study_history(gateway_id, study_uid)
    finally:
        ledger.close()
    for run in (history or {}).get("runs", []):
        for out in run["outputs"]:
            if out["sop_instance_uid"] == sop_instance_uid:
                return str(out["path"])
    return ""


# -- operator actions: requests carried out by the running service --------------------------


@dataclass(frozen=True)
class ActionOutcome:
    """What became of a ``resend`` or ``reprocess`` request.

    ``code``: 0 carried out, 1 failed / unknown study / no answer, 2 malformed ids (the
    CLI's exit codes); ``answered``: the message is the service's answer (else it says why
    there is none)."""

    code: int
    message: str
    state: str = ""
    answered: bool = False

    @property
    def ok(self) -> bool:
        return self.code == 0


def request_action(
    config: Config, kind: str, gateway_id: str, study_uid: str, *, wait: float, queue: bool
) -> ActionOutcome:
    """Ask the running service to ``resend`` or ``reprocess`` a study and wait up to
    ``wait`` seconds for its answer (``python main.py resend|reprocess``; the console's
    actions). The gateway and study are checked read-only before anything is written;
    without an answer the request is withdrawn unless ``queue``."""
    problem = requests.validate(kind, gateway_id, study_uid)
    if problem:
        return ActionOutcome(2, f"error: {problem}")
    problem = check_study(config, gateway_id, study_uid)
    if not problem and kind == "resend":
        ledger = Ledger.open_readonly(config.ledger_path)
        assert ledger is not None
        try:
            if ledger.latest_run_with_outputs(gateway_id, study_uid) is None:
                problem = f"no written results to resend for gateway {gateway_id} study {study_uid}"
        finally:
            ledger.close()
    if problem:
        return ActionOutcome(1, f"error: {problem}; nothing requested")
    what = f"{kind} of gateway {gateway_id} study {study_uid}"
    sent = requests.submit(config.state_dir, kind, gateway_id, study_uid)
    result = requests.wait_for_result(config.state_dir, sent, wait)
    if result is None and not queue and not requests.withdraw(config.state_dir, sent):
        result = requests.wait_for_result(config.state_dir, sent, 0.5)  # taken just now
        if result is None:
            return ActionOutcome(
                1,
                f"{what}: the service took the request but gave no answer within {wait:g} s;"
                " it may still be carried out: see"
                f" `python main.py study {gateway_id} {study_uid}`",
                "taken",
            )
    elif result is None and not queue:
        return ActionOutcome(
            1,
            f"{what}: no running service picked up the request within {wait:g} s;"
            " withdrawn, nothing was done (is the service running? --queue leaves it queued)",
            "withdrawn",
        )
    elif result is None:
        return ActionOutcome(
            1,
            f"{what}: no running service picked up the request within {wait:g} s; it stays"
            f" queued (request {sent.request_id}) and is carried out when the service runs",
            "queued",
        )
    return ActionOutcome(
        0 if result.ok else 1,
        f"{what}: {result.state}" + (f": {result.message}" if result.message else ""),
        result.state,
        answered=True,
    )
