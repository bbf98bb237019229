"""Ledger: states, run uniqueness, sends, and durability across connections."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.ledger import Ledger, RunState, StudyState


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "STATE" / "ledger.sqlite3")


def test_study_state_changes_are_logged_once(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="service.ledger")
    assert ledger.set_study_state("1", "1.2.3", StudyState.RECEIVING)
    assert not ledger.set_study_state("1", "1.2.3", StudyState.RECEIVING)
    assert ledger.set_study_state("1", "1.2.3", StudyState.SKIPPED, "not a chest")
    assert ledger.study_state("1", "1.2.3") == (StudyState.SKIPPED, "not a chest")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "gateway=1 study=1.2.3 state=receiving",
        "gateway=1 study=1.2.3 state=skipped reason=not a chest",
    ]


def test_runs_are_unique_per_inputs_and_model_version(ledger: Ledger) -> None:
    run = ledger.start_run("1", "1.2.3", "annotate", "1.0", "d1", 3)
    assert ledger.find_run("1", "1.2.3", "d1", "annotate", "1.0").run_id == run  # type: ignore[union-attr]
    with pytest.raises(sqlite3.IntegrityError):
        ledger.start_run("1", "1.2.3", "annotate", "1.0", "d1", 3)
    assert ledger.find_run("1", "1.2.3", "d1", "annotate", "2.0") is None
    assert ledger.find_run("2", "1.2.3", "d1", "annotate", "1.0") is None  # keyed by gateway
    assert ledger.next_generation("1", "1.2.3", "d1") == 1
    again = ledger.start_run("1", "1.2.3", "annotate", "1.0", "d1", 3, generation=1)
    assert ledger.find_run("1", "1.2.3", "d1", "annotate", "1.0").run_id == again  # type: ignore[union-attr]


def test_run_states_outputs_and_sends_survive_reopen(ledger: Ledger, tmp_path: Path) -> None:
    run = ledger.start_run("1", "1.2.3", "annotate", "1.0", "d1", 1)
    ledger.add_output(run, tmp_path / "a.dcm", "1.2.840.10008.5.1.4.1.1.7", "1.2.9", "1.2.8")
    ledger.set_run_state(run, RunState.WRITTEN, findings={"images": {"1.2.9": {"X": 0.5}}})
    send = ledger.start_send(run, "ORTHANC@127.0.0.1:4242")
    ledger.close()

    reopened = Ledger(ledger.path)
    assert [s["state"] for s in reopened.interrupted_sends()] == ["sending"]
    reopened.finish_send(send, "success", "", [("1.2.9", "success", 0)])
    row = reopened.get_run(run)
    assert row is not None and row.state == RunState.WRITTEN
    assert row.findings == {"images": {"1.2.9": {"X": 0.5}}}
    assert [o["sop_instance_uid"] for o in reopened.outputs(run)] == ["1.2.9"]
    assert reopened.interrupted_sends() == []
    items = reopened.query("SELECT * FROM send_items WHERE send_id=?", (send,))
    assert [(i["sop_instance_uid"], i["status"], i["status_code"]) for i in items] == [
        ("1.2.9", "success", 0)
    ]


#: The ``runs`` table as the first release created it (no ``node`` column).
OLD_RUNS = """
CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    inputs_digest TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    previous_run_id INTEGER,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    n_inputs INTEGER NOT NULL DEFAULT 0,
    started REAL NOT NULL,
    finished REAL,
    timings TEXT NOT NULL DEFAULT '{}',
    findings TEXT NOT NULL DEFAULT '{}',
    UNIQUE (gateway_id, study_uid, inputs_digest, model_name, model_version, generation)
);
INSERT INTO runs (gateway_id, study_uid, model_name, model_version, inputs_digest, state,
    started) VALUES ('1', '1.2.3', 'annotate', '1.0', 'd0', 'written', 1.0);
"""


def test_old_ledger_gets_the_node_column_and_runs_record_their_node(tmp_path: Path) -> None:
    path = tmp_path / "STATE" / "ledger.sqlite3"
    path.parent.mkdir()
    old = sqlite3.connect(path)
    old.executescript(OLD_RUNS)
    old.close()
    ledger = Ledger(path)
    rows = ledger.query("SELECT run_id, node FROM runs")
    assert [(r["run_id"], r["node"]) for r in rows] == [(1, "")]  # the old run kept
    run = ledger.start_run("1", "1.2.3", "annotate", "1.0", "d1", 1, node="node-a")
    ledger.close()
    again = Ledger(path)  # a second open finds the column and changes nothing
    rows = again.query("SELECT run_id, node FROM runs ORDER BY run_id")
    assert [(r["run_id"], r["node"]) for r in rows] == [(1, ""), (run, "node-a")]
    again.close()
