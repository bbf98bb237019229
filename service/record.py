"""Record: what a finished run's outcome means for the ledger, as one transition.

:func:`run_transition` is a pure function from the pipeline's :class:`Finished` (plus the
run's identity, timings, the study's finished listing and the gateway's destination) to the
:class:`~service.ledger.Transition` that records it: ``failed`` with the reason, ``skipped``
when the model produced nothing, ``failed`` by the conformance gate, or ``written`` with a
``queued`` send when a destination is configured. Transient failures are not recorded here:
the engine retries them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from service.config import PacsConfig
from service.ledger import OutputRecord, SendChange, Transition
from service.pipeline import Finished
from service.values import RunState, SendState, StudyState

logger = logging.getLogger(__name__)


def describe(destination: PacsConfig) -> str:
    """A destination as recorded on its sends: ``AE@host:port``, or the DICOMweb URL."""
    if destination.dicomweb:
        return destination.url
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def run_transition(
    gateway_id: str,
    study_uid: str,
    run_id: int,
    done: Finished,
    timings: dict[str, float],
    listing: bytes | None,
    destination: PacsConfig,
) -> Transition:
    """The one transition that records a run that ended (not transiently)."""
    if "model_s" not in timings:
        stages = ("prepare_s", "forward_s", "build_s")
        timings["model_s"] = sum(timings.get(k, 0.0) for k in stages)
    outputs = [
        OutputRecord(o.path, o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid)
        for o in done.written
    ]
    base = Transition(
        gateway_id, study_uid, run_id=run_id, timings=timings, outputs=outputs, listing=listing
    )
    if done.error:
        return replace(
            base,
            study=StudyState.FAILED,
            reason=done.error,
            run=RunState.FAILED,
            events=[("ERROR", f"run {run_id} failed: {done.error}")],
        )
    if not done.written:
        return replace(
            base,
            study=StudyState.SKIPPED,
            reason="model produced no output",
            run=RunState.SKIPPED,
            findings=done.findings,
        )
    if done.problems:
        first = done.problems[0]
        reason = (
            f"conformance gate: {len(done.problems)} problem(s); {first.path.name}: {first.message}"
        )
        return replace(
            base,
            study=StudyState.FAILED,
            reason=reason,
            run=RunState.FAILED,
            findings=done.findings,
            events=[("ERROR", f"run {run_id}: {reason}")],
        )
    timings["written_at"] = time.time()
    send = None
    if destination.enabled:
        send = SendChange(SendState.QUEUED, destination=describe(destination))
    written = f"run {run_id}: {len(outputs)} object(s) written"
    return replace(
        base,
        study=StudyState.WRITTEN,
        reason=written + ("" if send else "; no destination configured"),
        run=RunState.WRITTEN,
        run_reason="",
        findings=done.findings,
        send=send,
    )
