"""The one-shot container contract through the service's own stages.

``python main.py run DICOM_IN DICOM_OUT [SERIES_UID] [--model NAME]`` is one run of the
service on one study, without watching, ledger or sending:

1. *assembly*: every file under DICOM_IN is inspected like a dropped file
   (:func:`service.assembly.inspect_file`: file and pixel budgets, incomplete files) and the
   chosen study is made by the service's rules (:func:`service.assembly.collate`): identical
   copies of one SOP Instance UID collapse to one, copies with different content are all
   rejected with the reason. Nothing waits: a file still incomplete is rejected.
2. *routing*: ``--model NAME``, else :func:`service.models.base.select_model` with the
   ``[defaults]`` rules.
3. *prepare / forward / finish*: :class:`service.pipeline.Pipeline` with one worker
   process, so the write (atomic), the conformance gate and the bounds on a run (the
   worker's ``worker_memory_mb``, ``run_timeout_seconds``) are the service's.
4. *publish*: the pipeline writes into a hidden staging folder inside DICOM_OUT; only when
   every object of the run passed the gate are they moved (hard link, so an existing file
   is never replaced) to ``DICOM_OUT/<SOPInstanceUID>.dcm``. An object that fails the gate
   goes to ``DICOM_OUT/.quarantine/gateway_run/`` with the rest of its run, and nothing
   of that run is left in DICOM_OUT as a result.

A result whose file name is already in DICOM_OUT (an earlier run of the same inputs with
the same model version: the output UIDs are derived from them) fails the run: existing
files are never overwritten or removed, and none of the new objects is published.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from service.assembly import (
    collate,
    incomplete_reason,
    inputs_digest,
    inspect_file,
    snapshot,
)
from service.config import Config
from service.conformance import Finding, quarantine_file
from service.fsutil import fsync_dir, is_within
from service.models import build_models
from service.models.base import Model, RunContext, select_model
from service.pipeline import Finished, Job, Pipeline, Written
from service.uids import UidFactory
from service.values import Instance, Rejected, Study

logger = logging.getLogger(__name__)

#: Exit codes of ``run`` (as in :mod:`service.cli`).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
#: The gateway id a one-shot run's study carries (output UIDs, quarantine sub-folder).
GATEWAY_ID = "run"
#: Under DICOM_OUT: where objects of a failed run are moved (``gateway_run/`` inside).
QUARANTINE_NAME = ".quarantine"
#: Under DICOM_OUT: prefix of the staging folder the pipeline writes into (removed at the end).
STAGING_PREFIX = ".staging-"
#: Why a file is not used that is incomplete when the run starts (nothing waits for it).
INCOMPLETE = "file is incomplete (truncated) at the start of the run"
#: Files not used that :meth:`Report.details` names one by one.
MAX_DETAIL_LINES = 20
#: Longest a run may stay in the pipeline (the worker's own deadline ends it sooner).
RUN_TIMEOUT_SECONDS = 24 * 3600.0


@dataclass
class Report:
    """What a one-shot run did: its exit code, the line for stderr and real counts."""

    code: int
    message: str = ""  # "error: …" / "skipped: …" for stderr; empty on success
    model: str = ""  # "name version" once a model ran
    study_uid: str = ""
    instances: list[Instance] = field(default_factory=list)  # used
    duplicates: list[Rejected] = field(default_factory=list)  # identical copies, ignored
    rejected: list[Rejected] = field(default_factory=list)  # files not used, with the reason
    other_studies: int = 0  # instances of other studies under DICOM_IN, not used
    written: list[Path] = field(default_factory=list)  # results in DICOM_OUT
    quarantined: list[Path] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)  # the conformance gate's findings
    dicom_in: Path | None = None
    dicom_out: Path | None = None

    def details(self, limit: int = MAX_DETAIL_LINES) -> list[str]:
        """One line per file not used, with the reason (at most ``limit``, then a count)."""
        lines = [
            f"file {_relative(r.path, self.dicom_in)} not used: {r.reason}"
            for r in (*self.rejected, *self.duplicates)
        ]
        if len(lines) > limit:
            lines[limit:] = [f"{len(lines) - limit} more file(s) not used"]
        return lines

    @property
    def summary(self) -> str:
        """The line for stdout once a model ran (else empty): the real numbers."""
        if not self.model:
            return ""
        text = (
            f"{self.model}: {len(self.instances)} instance(s) used, "
            f"{len(self.duplicates)} duplicate(s) ignored, {len(self.rejected)} file(s) "
            f"rejected, {len(self.written)} object(s) written to {self.dicom_out}"
        )
        if self.other_studies:
            text += f", {self.other_studies} instance(s) of other studies not used"
        if self.quarantined:
            where = self.quarantined[0].parent
            text += f", {len(self.quarantined)} object(s) quarantined in {where}"
        return text


def _relative(path: Path, root: Path | None) -> str:
    if root is not None and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return str(path)


def _fail(report: Report, code: int, text: str) -> Report:
    report.code = code
    report.message = f"{'skipped' if code == EXIT_SKIPPED else 'error'}: {text}"
    return report


def run_oneshot(
    config: Config,
    dicom_in: Path,
    dicom_out: Path,
    series_uid: str | None = None,
    model_name: str | None = None,
    *,
    models: dict[str, Model] | None = None,
) -> Report:
    """Run the routed model (or ``model_name``) on the study under ``dicom_in`` (the one
    holding ``series_uid`` when given) and publish the results into ``dicom_out``.

    ``models`` are the loaded models to route to (default: built from ``config``, those
    the ``[defaults]`` rules or ``model_name`` name). Raises ConfigError for an unknown
    model name. Input files are only read.
    """
    report = Report(EXIT_OK, dicom_in=dicom_in, dicom_out=dicom_out)
    if not dicom_in.is_dir():
        return _fail(report, EXIT_USAGE, f"input folder {dicom_in} does not exist")
    if dicom_out.exists() and not dicom_out.is_dir():
        return _fail(report, EXIT_USAGE, f"output {dicom_out} exists and is not a folder")
    if is_within(dicom_out, dicom_in):
        return _fail(report, EXIT_USAGE, f"output folder {dicom_out} is inside {dicom_in}")
    study = _assemble(config, dicom_in, series_uid, report)
    if study is None:
        return report
    report.study_uid = study.study_uid

    if models is None:
        names = {model_name} if model_name else {r.model for r in config.defaults.rules}
        models = build_models(config, names)
    if model_name:
        if model_name not in models:
            return _fail(report, EXIT_USAGE, f"unknown model {model_name!r}")
        verdict = models[model_name].applies(study)
        chosen, why_not = (models[model_name] if verdict.ok else None), verdict.reason
    else:
        chosen, why_not = select_model(config.defaults.rules, models, study)
    if chosen is None:
        return _fail(report, EXIT_SKIPPED, why_not)
    readiness = chosen.ready()
    if not readiness.ok:
        return _fail(report, EXIT_FAILED, f"model {chosen.name} not ready: {readiness.reason}")
    report.model = f"{chosen.name} {chosen.version}"

    try:
        dicom_out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dicom_out))
    except OSError as exc:
        return _fail(report, EXIT_FAILED, f"cannot write into {dicom_out}: {exc.strerror}")
    try:
        finished = _run(config, study, chosen, series_uid, staging)
        return _conclude(report, finished, dicom_out)
    except OSError as exc:  # publishing or quarantining: what was moved is in the report
        return _fail(report, EXIT_FAILED, f"cannot publish into {dicom_out}: {exc}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # our own folder: empty or withheld copies


def _assemble(
    config: Config, dicom_in: Path, series_uid: str | None, report: Report
) -> Study | None:
    """The chosen study by the service's assembly rules; None (report filled) if none."""
    inspected: list[tuple[str, Instance | Rejected | None]] = []
    for rel in sorted(snapshot(dicom_in, dicom_in)):
        found = inspect_file(
            dicom_in / rel,
            max_file_bytes=config.max_file_bytes,
            max_pixels=config.max_pixels,
            max_elements=config.max_elements,
        )
        inspected.append((rel, found))
    by_study: dict[str, list[tuple[str, Instance | Rejected | None]]] = {}
    unassigned: list[tuple[str, Instance | Rejected | None]] = []
    for rel, found in inspected:
        if isinstance(found, Instance):
            by_study.setdefault(found.study_instance_uid, []).append((rel, found))
        else:
            unassigned.append((rel, found))
    candidates = sorted(by_study)
    if series_uid is not None:
        candidates = [
            uid
            for uid in candidates
            if any(
                isinstance(f, Instance) and f.series_instance_uid == series_uid
                for _rel, f in by_study[uid]
            )
        ]
    if len(candidates) != 1:
        report.rejected = [_as_rejected(f, dicom_in / rel) for rel, f in unassigned]
        rejected = f" ({len(report.rejected)} file(s) rejected)" if report.rejected else ""
        if not candidates:
            what = f"series {series_uid}" if series_uid else "any DICOM instance"
            _fail(report, EXIT_FAILED, f"no usable input: {dicom_in} holds no {what}{rejected}")
        elif series_uid:
            _fail(
                report,
                EXIT_USAGE,
                f"series {series_uid} appears in {len(candidates)} studies under {dicom_in}",
            )
        else:
            _fail(
                report,
                EXIT_USAGE,
                f"{dicom_in} holds {len(candidates)} studies; name the SERIES_UID to choose",
            )
        return None
    study_uid = candidates[0]
    report.other_studies = sum(len(v) for k, v in by_study.items() if k != study_uid)
    study = collate(GATEWAY_ID, study_uid, dicom_in, [*by_study[study_uid], *unassigned])
    # one shot: nothing is waited for, a file still incomplete now is rejected
    study.rejected += [Rejected(p, incomplete_reason(p, INCOMPLETE)) for p in study.incomplete]
    study.incomplete = []
    report.instances = list(study.instances)
    report.duplicates = [r for r in study.rejected if not r.quarantine]
    report.rejected = [r for r in study.rejected if r.quarantine]
    if not study.instances:
        _fail(
            report,
            EXIT_FAILED,
            f"no usable input: all {len(report.rejected)} file(s) of study {study_uid} "
            f"were rejected; first: {report.rejected[0].reason}",
        )
        return None
    if study.refused:
        _fail(report, EXIT_FAILED, study.refused)
        return None
    if series_uid and not any(i.series_instance_uid == series_uid for i in study.instances):
        _fail(
            report,
            EXIT_FAILED,
            f"no usable input: every file of series {series_uid} was rejected",
        )
        return None
    return study


def _as_rejected(found: Instance | Rejected | None, path: Path) -> Rejected:
    if isinstance(found, Rejected):
        return found
    return Rejected(path, incomplete_reason(path, INCOMPLETE))


def _run(
    config: Config, study: Study, model: Model, series_uid: str | None, staging: Path
) -> Finished:
    """Prepare, forward and finish in this process: the service's pipeline with no workers."""
    digest = inputs_digest(study.instances)
    uids = UidFactory(
        config.uid_root, GATEWAY_ID, study.study_uid, digest, model.name, model.version
    )
    ctx = RunContext(uids, run_id=0, trigger_series_uid=series_uid, started=datetime.now())
    # one guarded worker process: the memory limit and the deadline hold as in the service
    pipeline = Pipeline(
        1,
        staging,
        max_batch=config.max_batch,
        batch_wait=config.batch_wait_seconds,
        memory_mb=config.worker_memory_mb,
        run_timeout=config.run_timeout_seconds,
    )
    try:
        pipeline.submit(Job(0, study, model, ctx, "flat"))
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while True:
            outcomes = pipeline.pump()
            if outcomes:
                return outcomes[0].finished
            if time.monotonic() > deadline:  # pragma: no cover - the worker's deadline ends it
                return Finished(error="run did not finish")
            pipeline.wait(0.1)
    finally:
        pipeline.close()


def _conclude(report: Report, done: Finished, dicom_out: Path) -> Report:
    """Publish a run that passed the gate; quarantine one that did not."""
    quarantine = dicom_out / QUARANTINE_NAME
    if done.error:
        report.quarantined = _withhold(done.written, quarantine, "run failed")
        return _fail(report, EXIT_FAILED, f"run failed: {done.error}{_where(report)}")
    if not done.written:
        reason = "; ".join(sorted(set(done.skipped.values()))) or "no reason given"
        return _fail(report, EXIT_SKIPPED, f"model produced no output: {reason}")
    if done.problems:
        report.problems = done.problems
        failing = {f.path for f in done.problems}
        for finding in done.problems:
            logger.error("output %s fails the gate: %s", finding.path.name, finding.message)
        report.quarantined = _withhold(
            done.written, quarantine, "conformance gate", failing=failing
        )
        first = done.problems[0]
        return _fail(
            report,
            EXIT_FAILED,
            f"conformance gate: {len(done.problems)} problem(s) in {len(failing)} of "
            f"{len(done.written)} object(s); {first.path.name}: {first.message}{_where(report)}",
        )
    existing = [w for w in done.written if os.path.lexists(dicom_out / w.path.name)]
    if existing:
        return _fail(
            report,
            EXIT_FAILED,
            f"{dicom_out} already holds {len(existing)} of this run's {len(done.written)} "
            f"file(s) (e.g. {existing[0].path.name}, from an earlier run of the same inputs "
            "and model version): nothing written, existing files left as they were",
        )
    published = _publish(done.written, dicom_out)
    if published is None:
        return _fail(
            report,
            EXIT_FAILED,
            f"a result file appeared in {dicom_out} while publishing: nothing written, "
            "existing files left as they were",
        )
    report.written = published
    return report


def _where(report: Report) -> str:
    if not report.quarantined:
        return ""
    return f" ({len(report.quarantined)} object(s) moved to {report.quarantined[0].parent})"


def _withhold(
    written: list[Written], quarantine: Path, why: str, failing: set[Path] | None = None
) -> list[Path]:
    """Move a failed run's objects out of the way: none of them is a result."""
    moved = []
    for out in written:
        if not out.path.exists():
            continue
        target = quarantine_file(out.path, quarantine, GATEWAY_ID)
        moved.append(target)
        what = "fails the gate" if failing is not None and out.path in failing else why
        logger.error("output %s quarantined as %s (%s)", out.path.name, target, what)
    return moved


def _publish(written: list[Written], dicom_out: Path) -> list[Path] | None:
    """Link each staged object to ``dicom_out/<name>``, never replacing a file; all or
    none (None when a name was taken meanwhile: the links made are undone)."""
    done: list[Path] = []
    for out in written:
        target = dicom_out / out.path.name
        try:
            os.link(out.path, target)
        except FileExistsError:
            for path in done:
                path.unlink()
            return None
        except OSError:  # no hard links on this file system: check, then rename
            if os.path.lexists(target):
                for path in done:
                    path.unlink()
                return None
            os.replace(out.path, target)
        done.append(target)
    fsync_dir(dicom_out)
    return done
