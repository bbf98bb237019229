"""The run pipeline: worker processes, batching across studies, dead workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.config import CxrConfig
from service.errors import ModelNotReady
from service.models.annotate import AnnotateModel
from service.models.base import Applicability, ModelResult, Prepared, RunContext
from service.models.cxr import CxrModel
from service.pipeline import Finished, Job, Outcome, Pipeline, _failure, merge_parts
from service.uids import UidFactory
from service.values import Study
from tests.conftest import dciodvfy, shared_file
from tests.test_cxr import ROOT, study_of, write_checkpoint

CXR = ("siim-cr-pa-jpeg.dcm", "cr-mono1-chest-nometa", "nema-rg1-pa-j2k.dcm")
STARTED = datetime(2026, 11, 22, 7, 30, 5)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> CxrModel:
    weights = write_checkpoint(tmp_path_factory.mktemp("weights"))
    return CxrModel(CxrConfig(weights=str(weights), device="cpu"))


def job(run_id: int, study: Study, model: object) -> Job:
    ctx = RunContext(UidFactory(ROOT, "test", study.study_uid), run_id, started=STARTED)
    return Job(run_id, study, model, ctx, "study")  # type: ignore[arg-type]


def run_all(pipeline: Pipeline, jobs: list[Job], timeout: float = 120) -> list[Outcome]:
    for j in jobs:
        pipeline.submit(j)
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + timeout
    while pipeline.in_flight and time.monotonic() < deadline:
        outcomes.extend(pipeline.pump())
        pipeline.wait(0.5)
    outcomes.extend(pipeline.pump())
    assert not pipeline.in_flight, "pipeline did not finish in time"
    return sorted(outcomes, key=lambda o: o.job.run_id)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """Two worker processes (started once: each imports pydicom and highdicom)."""
    output = tmp_path_factory.mktemp("workers") / "OUTPUT"
    pipeline = Pipeline(2, output, max_batch=8, batch_wait=30.0)
    yield pipeline
    pipeline.close()


def test_studies_prepared_together_share_one_forward_with_the_scores_of_a_lone_run(
    model: CxrModel, workers: Pipeline
) -> None:
    studies = [study_of(shared_file(f"cxr/{name}")) for name in CXR]
    outcomes = run_all(workers, [job(n, s, model) for n, s in enumerate(studies, 1)])
    assert [o.finished.error for o in outcomes] == ["", "", ""]
    # batch_wait is 30 s: the three studies went into one forward as soon as all were ready
    assert [o.timings["batch"] for o in outcomes] == [3.0, 3.0, 3.0]
    for outcome, study in zip(outcomes, studies, strict=True):
        lone = model.run(study, outcome.job.ctx)
        uid = study.instances[0].sop_instance_uid
        batched = outcome.finished.findings["images"][uid]
        assert batched == pytest.approx(lone.findings["images"][uid], abs=1e-5)
        assert outcome.finished.problems == []
        written = outcome.finished.written
        assert sorted(w.sop_instance_uid for w in written) == sorted(
            str(ds.SOPInstanceUID) for ds in lone.datasets
        )
        for out in written:
            assert out.path.is_relative_to(workers.output_dir / "gateway_1" / study.study_uid)
            assert pydicom.dcmread(out.path).SOPInstanceUID == out.sop_instance_uid
            assert not [line for line in dciodvfy(out.path) if line.startswith("Error")]


def test_a_lone_study_does_not_wait_for_a_batch(tmp_path: Path, model: CxrModel) -> None:
    pipeline = Pipeline(0, tmp_path / "OUTPUT", max_batch=8, batch_wait=3600.0)
    try:
        pipeline.submit(job(1, study_of(shared_file(f"cxr/{CXR[0]}")), model))
        (outcome,) = pipeline.pump()  # nothing else is being prepared: forward at once
        assert outcome.finished.error == "" and outcome.timings["batch"] == 1.0
        assert pipeline.in_flight == 0
    finally:
        pipeline.close()


def test_batches_hold_at_most_max_batch_rows(tmp_path: Path, model: CxrModel) -> None:
    pipeline = Pipeline(0, tmp_path / "OUTPUT", max_batch=2, batch_wait=0.0)
    try:
        study = study_of(shared_file(f"cxr/{CXR[0]}"))
        jobs = [job(n, study, model) for n in range(1, 6)]
        for j in jobs:
            pipeline.submit(j)
        outcomes = pipeline.pump()
        assert sorted(o.timings["batch"] for o in outcomes) == [1.0, 2.0, 2.0, 2.0, 2.0]
    finally:
        pipeline.close()


def test_unstaged_model_runs_whole_in_a_worker(workers: Pipeline) -> None:
    study = study_of(sorted(shared_file("gateway-sample/INPUT/gateway_1").glob("*/*"))[0])
    (outcome,) = run_all(workers, [job(1, study, AnnotateModel())])
    assert outcome.finished.error == "" and outcome.finished.problems == []
    assert "model_s" in outcome.timings and "batch" not in outcome.timings
    assert [w.path.exists() for w in outcome.finished.written] == [True]


def test_a_series_is_split_across_workers_into_the_objects_of_one_run(
    workers: Pipeline,
) -> None:
    files = sorted(shared_file("series/mr-phantom-63").iterdir())[:9]
    study = study_of(*files)
    (outcome,) = run_all(workers, [job(1, study, AnnotateModel())])
    done = outcome.finished
    assert done.error == "" and done.problems == [] and outcome.timings["parts"] == 2.0
    whole = AnnotateModel().run(study, outcome.job.ctx)  # the same run in one piece
    assert sorted(w.sop_instance_uid for w in done.written) == sorted(
        str(ds.SOPInstanceUID) for ds in whole.datasets
    )
    assert done.findings == whole.findings
    written = [pydicom.dcmread(w.path, stop_before_pixels=True) for w in done.written]
    assert {(ds.SeriesInstanceUID, ds.SeriesDate, ds.SeriesTime) for ds in written} == {
        (whole.datasets[0].SeriesInstanceUID, "20261122", "073005")
    }


def test_merged_parts_fail_with_the_first_error_or_when_nothing_was_produced() -> None:
    model = AnnotateModel()
    empty = [
        Finished(skipped={"1.2.1": "no pixel data"}),
        Finished(skipped={"1.2.2": "no pixel data"}),
    ]
    assert merge_parts(model, empty).error == "annotate produced nothing: no pixel data"
    failed = [Finished(error="OSError: disk full"), Finished(findings={"instances": 1})]
    merged = merge_parts(model, failed)
    assert merged.error == "OSError: disk full" and merged.findings["instances"] == 1


class FaultModel:
    """What a model declares, for the fault-injecting models below: always applies."""

    name = "test"
    version = "1"

    def ready(self) -> Applicability:
        return Applicability(True)

    def applies(self, study: Study) -> Applicability:
        return Applicability(True)


class ExitingModel(FaultModel):
    """A model whose preparation kills its worker process, as an out-of-memory kill would."""

    def prepare(self, study: Study, ctx: RunContext) -> Prepared:
        os._exit(9)

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        return inputs

    def finish(self, prepared: Prepared, outputs: np.ndarray, ctx: RunContext) -> ModelResult:
        return ModelResult([])

    def run(self, study: Study, ctx: RunContext) -> ModelResult:
        return ModelResult([])


def test_a_dying_worker_fails_its_run_after_one_retry_and_others_still_finish(
    model: CxrModel, workers: Pipeline
) -> None:
    good = study_of(shared_file(f"cxr/{CXR[0]}"))
    outcomes = run_all(workers, [job(1, good, ExitingModel()), job(2, good, model)])
    assert outcomes[0].finished.error == "worker process exited unexpectedly twice"
    assert outcomes[0].job.retried
    assert outcomes[1].finished.error == "" and outcomes[1].finished.written


class HalfWritableModel(FaultModel):
    """A model (without stages) whose second result has an unusable SOP Instance UID."""

    def run(self, study: Study, ctx: RunContext) -> ModelResult:
        good = pydicom.dcmread(study.instances[0].path)
        good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = ctx.uids.uid("good")
        bad = pydicom.dcmread(study.instances[0].path)
        bad.SOPInstanceUID = "1.2..3"
        return ModelResult([good, bad])


def test_a_failed_write_still_reports_what_was_written(tmp_path: Path) -> None:
    pipeline = Pipeline(0, tmp_path / "OUTPUT")
    study = study_of(sorted(shared_file("gateway-sample/INPUT/gateway_1").glob("*/*"))[0])
    (outcome,) = run_all(pipeline, [job(1, study, HalfWritableModel())])
    assert outcome.finished.error.startswith("OutputError: SOPInstanceUID '1.2..3'")
    (written,) = outcome.finished.written
    assert written.path.is_file()
    assert written.sop_instance_uid == outcome.job.ctx.uids.uid("good")


def test_workers_never_import_torch(tmp_path: Path, model: CxrModel) -> None:
    """Workers decode and build DICOM: after CXR runs, neither maps torch's library (it
    would cost seconds at start and hundreds of MB each)."""
    pipeline = Pipeline(2, tmp_path / "OUTPUT", max_batch=8, batch_wait=0.0)
    try:
        study = study_of(shared_file(f"cxr/{CXR[0]}"))
        outcomes = run_all(pipeline, [job(1, study, model), job(2, study, model)])
        assert [o.finished.error for o in outcomes] == ["", ""]
        processes = list(pipeline._pool._processes.values())  # type: ignore[union-attr, attr-defined]
        assert len(processes) == 2
        for process in processes:
            maps = Path(f"/proc/{process.pid}/maps").read_text()
            assert "libtorch" not in maps
    finally:
        pipeline.close()


class LoadingModel(FaultModel):
    """A batched model whose network is still loading until the test says otherwise."""

    loading = True

    def prepare(self, study: Study, ctx: RunContext) -> Prepared:
        return Prepared(np.zeros((1, 1), np.float32))

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        return inputs

    def finish(self, prepared: Prepared, outputs: np.ndarray, ctx: RunContext) -> ModelResult:
        return ModelResult([])

    def run(self, study: Study, ctx: RunContext) -> ModelResult:
        return ModelResult([])


def test_studies_are_prepared_while_the_network_loads(tmp_path: Path) -> None:
    pipeline = Pipeline(0, tmp_path / "OUTPUT", max_batch=8, batch_wait=0.0)
    model = LoadingModel()
    study = study_of(shared_file(f"cxr/{CXR[0]}"))
    pipeline.submit(job(1, study, model))
    assert pipeline.pump() == [] and pipeline.in_flight == 1  # prepared, no forward yet
    model.loading = False
    (outcome,) = pipeline.pump()
    assert outcome.finished.error == "" and outcome.timings["batch"] == 1.0


def test_a_network_that_failed_to_load_makes_its_studies_wait() -> None:
    """Studies accepted while the network loaded, whose forward then finds it failed, wait
    (transient: tried again, then ``waiting_model``), they do not fail."""
    failed = _failure(ModelNotReady("cannot load weights file w.pt: EOFError"))
    assert failed.transient and "cannot load weights file" in failed.error


TRIM_PROBE = """
import os, sys
from service.pipeline import TRIM_ABOVE_MB, _resident_mb, release_memory

def held(megabytes: float) -> float:
    '''Resident MiB after ``megabytes`` of small heap blocks were freed but for every 16th
    (so glibc cannot give them back by itself), then after release_memory().'''
    blocks = [bytearray(4096) for _ in range(int(megabytes * 256))]
    keep = blocks[::16]
    del blocks
    freed = _resident_mb(os.getpid())
    release_memory()
    return freed - _resident_mb(os.getpid())

release_memory()  # the first call trims and sets the baseline
print(held(TRIM_ABOVE_MB / 4), held(TRIM_ABOVE_MB * 2))
"""


def test_freed_memory_is_given_back_only_past_the_threshold() -> None:
    """A worker trims the heap once it holds TRIM_ABOVE_MB more than after its last trim,
    not after every task (the next study then faulted its pages in again)."""
    done = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
        timeout=120,
    )
    small, large = (float(v) for v in done.stdout.split())
    assert abs(small) < 2  # below the threshold: kept for the next study
    assert large > 64  # past it: most of the 128 MiB given back
