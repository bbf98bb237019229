"""Engine scheduling: fair turns across gateways, cheap re-touches, recorded run moments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from devtools.sample import pydicom_file
from service.config import load_config
from service.engine import Engine, fair_order
from service.ledger import StudyState
from service.models import build_models
from service.readiness import Watch
from tests.helpers import write_config


def make_engine(tmp_path: Path, **service: Any) -> Engine:
    config = load_config(write_config(tmp_path, **service), environ={})
    return Engine(config, build_models(config))


def drop_study(tmp_path: Path, gateway_id: str) -> str:
    """One real CT instance re-identified into a new study under ``gateway_<id>``."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder = tmp_path / "INPUT" / f"gateway_{gateway_id}" / str(ds.StudyInstanceUID)
    folder.mkdir(parents=True)
    ds.save_as(folder / str(ds.SOPInstanceUID), enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def test_fair_order_interleaves_gateways_starting_after_the_last_served() -> None:
    due = [
        ((g, s), Watch(first_seen=0.0))
        for g, s in [("a", "1"), ("a", "2"), ("a", "3"), ("c", "9"), ("b", "5"), ("b", "6")]
    ]
    keys = [key for key, _ in fair_order(due)]
    assert keys == [("a", "1"), ("b", "5"), ("c", "9"), ("a", "2"), ("b", "6"), ("a", "3")]
    keys = [key for key, _ in fair_order(due, last_gateway="a")]
    assert keys == [("b", "5"), ("c", "9"), ("a", "1"), ("b", "6"), ("a", "2"), ("a", "3")]
    keys = [key for key, _ in fair_order(due, last_gateway="c")]
    assert keys[0] == ("a", "1")
    assert fair_order([]) == []


def test_a_flooded_gateway_does_not_starve_another(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    try:
        flood = [drop_study(tmp_path, "1") for _ in range(4)]
        lone = drop_study(tmp_path, "2")
        for study in flood:
            engine.touch("1", study)
        engine.touch("2", lone)  # touched last, behind the whole flood
        assert engine.tick(now=0.0) is False  # first look: not quiet yet, nothing runs
        order = []
        for tick in range(1, 10):
            ran = engine.tick(now=100.0 + tick)
            order.append([(r.gateway_id, r.study_uid) for r in engine.ledger.runs()])
            if not ran:
                break
        runs = order[-1]
        assert len(runs) == 5
        assert runs[1] == ("2", lone)  # second, not fifth
        assert order[0] == [("1", flood[0]), ("2", lone)]  # one run per gateway per tick
        assert [study for _, study in runs if study != lone] == flood  # touch order kept
    finally:
        engine.close()


def test_a_stable_study_without_room_is_queued_then_runs_as_soon_as_there_is(
    tmp_path: Path,
) -> None:
    engine = make_engine(tmp_path, max_batch=1)  # in-process: one run at a time
    try:
        first, second = drop_study(tmp_path, "1"), drop_study(tmp_path, "2")
        engine.touch("1", first)
        engine.touch("2", second)
        engine.tick(now=0.0)
        engine.tick(now=10.0)
        assert [r.study_uid for r in engine.ledger.runs()] == [first]
        assert engine.ledger.study_state("2", second) == (
            StudyState.READY,
            "stable; queued until the pipeline has room",
        )
        engine.tick(now=10.001)  # room again: no wait for its next recheck
        assert [r.study_uid for r in engine.ledger.runs()] == [first, second]
    finally:
        engine.close()


def run_new_study(engine: Engine, tmp_path: Path) -> str:
    """Drop a study on gateway_1 and tick until it ran (quiet for 10 s of engine time)."""
    study = drop_study(tmp_path, "1")
    engine.touch("1", study)
    engine.tick(now=0.0)
    assert engine.tick(now=10.0) is True
    assert engine.pending_count == 0
    return study


def test_touching_a_finished_unchanged_study_does_no_ledger_work(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    try:
        study = run_new_study(engine, tmp_path)
        updated = engine.ledger.query("SELECT updated FROM instances")
        engine.touch("1", study)  # e.g. a periodic full rescan
        assert engine.tick(now=20.0) is False
        assert engine.pending_count == 0
        assert engine.ledger.query("SELECT updated FROM instances") == updated
        assert len(engine.ledger.runs()) == 1
        # a changed listing is looked at again: a new file means a new run
        folder = tmp_path / "INPUT" / "gateway_1" / study
        ds = dcmread(next(folder.iterdir()))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / str(ds.SOPInstanceUID), enforce_file_format=True)
        engine.touch("1", study)
        engine.tick(now=30.0)
        engine.tick(now=40.0)
        assert len(engine.ledger.runs()) == 2
    finally:
        engine.close()


def test_a_restart_does_not_read_finished_unchanged_studies_again(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    try:
        study = run_new_study(engine, tmp_path)
        updated = engine.ledger.query("SELECT path, updated FROM instances")
    finally:
        engine.close()
    engine = make_engine(tmp_path)  # a restart: the startup scan touches every study
    try:
        engine.touch("1", study)
        assert engine.tick(now=0.0) is False
        assert engine.pending_count == 0  # finished at the first look, files not read
        assert engine.ledger.query("SELECT path, updated FROM instances") == updated
        assert len(engine.ledger.runs()) == 1
        engine.touch("1", study, reprocess=True)  # an explicit reprocess still runs it
        engine.tick(now=20.0)
        engine.tick(now=30.0)
        assert len(engine.ledger.runs()) == 2
    finally:
        engine.close()


def test_run_timings_record_when_the_study_became_stable_and_was_written(
    tmp_path: Path,
) -> None:
    engine = make_engine(tmp_path)
    try:
        study = drop_study(tmp_path, "1")
        engine.touch("1", study)
        engine.tick(now=0.0)
        engine.tick(now=10.0)
        rows = engine.ledger.query("SELECT timings, state FROM runs")
        assert len(rows) == 1 and rows[0]["state"] == "written"
        timings = json.loads(rows[0]["timings"])
        assert timings["stable_at"] <= timings["started_at"] <= timings["written_at"]
        assert timings["model_s"] >= 0 and timings["write_s"] >= 0
    finally:
        engine.close()
