"""Ledger: one transition per change, the legal-transition tables, recovery, durability."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.ledger import (
    IllegalTransition,
    InstanceRecord,
    Ledger,
    LedgerUnavailable,
    NewRun,
    OutputRecord,
    SendChange,
    Transition,
)
from service.values import (
    RUN_TRANSITIONS,
    STUDY_TRANSITIONS,
    RunState,
    SendState,
    StudyState,
)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "STATE" / "ledger.sqlite3")


def new_run(ledger: Ledger, digest: str = "d1", generation: int = 0, study: str = "1.2.3") -> int:
    applied = ledger.apply(
        Transition(
            "1",
            study,
            StudyState.RUNNING,
            new_run=NewRun("annotate", "1.0", digest, 1, generation, node="n1"),
        )
    )
    assert applied.run_id is not None
    return applied.run_id


def written(ledger: Ledger, run: int, tmp_path: Path, send: bool = True) -> int | None:
    applied = ledger.apply(
        Transition(
            "1",
            "1.2.3",
            StudyState.WRITTEN,
            "1 object(s) written",
            run_id=run,
            run=RunState.WRITTEN,
            findings={"images": {"1.2.9": {"X": 0.5}}},
            outputs=[
                OutputRecord(tmp_path / "a.dcm", "1.2.840.10008.5.1.4.1.1.7", "1.2.9", "1.2.8")
            ],
            send=SendChange(SendState.QUEUED, destination="PACS@127.0.0.1:4242") if send else None,
        )
    )
    return applied.send_id


def test_study_state_changes_are_logged_once(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="service.ledger")
    assert ledger.apply(Transition("1", "1.2.3", StudyState.RECEIVING)).study_changed
    assert not ledger.apply(Transition("1", "1.2.3", StudyState.RECEIVING)).study_changed
    assert ledger.apply(Transition("1", "1.2.3", StudyState.SKIPPED, "not a chest")).study_changed
    assert ledger.study_state("1", "1.2.3") == (StudyState.SKIPPED, "not a chest")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "gateway=1 study=1.2.3 state=receiving",
        "gateway=1 study=1.2.3 state=skipped reason=not a chest",
    ]


def test_runs_are_unique_per_inputs_and_model_version(ledger: Ledger) -> None:
    run = new_run(ledger)
    assert ledger.find_run("1", "1.2.3", "d1", "annotate", "1.0").run_id == run  # type: ignore[union-attr]
    with pytest.raises(LedgerUnavailable) as caught:  # the UNIQUE constraint, rolled back
        new_run(ledger)
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    assert ledger.find_run("1", "1.2.3", "d1", "annotate", "2.0") is None
    assert ledger.find_run("2", "1.2.3", "d1", "annotate", "1.0") is None  # keyed by gateway
    assert ledger.next_generation("1", "1.2.3", "d1") == 1
    again = new_run(ledger, generation=1)
    assert ledger.find_run("1", "1.2.3", "d1", "annotate", "1.0").run_id == again  # type: ignore[union-attr]
    assert ledger.get_run(again).node == "n1"  # type: ignore[union-attr]


def test_illegal_transition_changes_nothing(ledger: Ledger, tmp_path: Path) -> None:
    run = new_run(ledger)
    before = ledger.query("SELECT * FROM studies"), ledger.query("SELECT * FROM runs")
    # a study cannot be 'sent' without a send; the run part must roll back with it
    with pytest.raises(IllegalTransition):
        ledger.apply(
            Transition(
                "1",
                "1.2.3",
                StudyState.SENT,
                run_id=run,
                run=RunState.WRITTEN,
                events=[("INFO", "x")],
            )
        )
    after = ledger.query("SELECT * FROM studies"), ledger.query("SELECT * FROM runs")
    assert [list(map(tuple, t)) for t in before] == [list(map(tuple, t)) for t in after]
    assert ledger.query("SELECT * FROM events") == []
    with pytest.raises(IllegalTransition):  # written -> running is not a legal run change
        written(ledger, run, tmp_path, send=False)
        ledger.apply(Transition("1", "1.2.3", run_id=run, run=RunState.RUNNING))


def test_tables_have_no_dead_ends_but_the_final_states() -> None:
    for state in StudyState:
        assert state in STUDY_TRANSITIONS
        assert STUDY_TRANSITIONS[state], state  # every study state can move on
    assert StudyState.SENT in STUDY_TRANSITIONS[StudyState.SENDING]
    assert StudyState.SENT not in STUDY_TRANSITIONS[StudyState.WRITTEN]  # only through sending
    for run_state in RunState:
        assert run_state in RUN_TRANSITIONS


def test_one_transaction_holds_run_study_outputs_send_and_event(
    ledger: Ledger, tmp_path: Path
) -> None:
    run = new_run(ledger)
    send = written(ledger, run, tmp_path)
    assert send is not None
    assert ledger.study_state("1", "1.2.3") == (StudyState.WRITTEN, "1 object(s) written")
    assert ledger.get_run(run).state == RunState.WRITTEN  # type: ignore[union-attr]
    assert [s["state"] for s in ledger.sends(run)] == ["queued"]
    assert [o["sop_instance_uid"] for o in ledger.outputs(run)] == ["1.2.9"]


def test_recovery_follows_from_the_states(ledger: Ledger, tmp_path: Path) -> None:
    """A queued send (never opened) goes again; an open one is interrupted, never resent."""
    run = new_run(ledger)
    queued = written(ledger, run, tmp_path)
    other = new_run(ledger, "d2", study="1.2.4")
    ledger.apply(
        Transition(
            "1",
            "1.2.4",
            StudyState.WRITTEN,
            run_id=other,
            run=RunState.WRITTEN,
            send=SendChange(SendState.QUEUED, destination="PACS@127.0.0.1:4242"),
        )
    )
    (opened,) = [s["send_id"] for s in ledger.sends(other)]
    ledger.apply(
        Transition(
            "1",
            "1.2.4",
            StudyState.SENDING,
            run_id=other,
            run=RunState.SENDING,
            send=SendChange(SendState.SENDING, opened),
        )
    )
    ledger.close()

    reopened = Ledger(ledger.path)
    recovery = reopened.recover()
    assert recovery.interrupted == 1
    assert [(q.send_id, q.run_id) for q in recovery.queued] == [(queued, run)]
    assert reopened.study_state("1", "1.2.4")[0] == StudyState.SEND_FAILED  # type: ignore[index]
    assert reopened.get_run(other).state == RunState.SEND_FAILED  # type: ignore[union-attr]
    assert [s["state"] for s in reopened.sends(other)] == ["interrupted"]
    assert reopened.recover().interrupted == 0  # recovery is idempotent


def test_send_outcome_and_items_survive_reopen(ledger: Ledger, tmp_path: Path) -> None:
    run = new_run(ledger)
    send = written(ledger, run, tmp_path)
    for study, run_state, change in (
        (StudyState.SENDING, RunState.SENDING, SendChange(SendState.SENDING, send)),
        (
            StudyState.SENT,
            RunState.SENT,
            SendChange(SendState.SUCCESS, send, items=[("1.2.9", "success", 0)]),
        ),
    ):
        ledger.apply(Transition("1", "1.2.3", study, run_id=run, run=run_state, send=change))
    ledger.close()
    reopened = Ledger(ledger.path)
    row = reopened.get_run(run)
    assert row is not None and row.state == RunState.SENT
    assert row.findings == {"images": {"1.2.9": {"X": 0.5}}}
    items = reopened.query("SELECT * FROM send_items WHERE send_id=?", (send,))
    assert [(i["sop_instance_uid"], i["status"], i["status_code"]) for i in items] == [
        ("1.2.9", "success", 0)
    ]
    with pytest.raises(IllegalTransition):  # an ended send never changes again
        reopened.apply(Transition("1", "1.2.3", send=SendChange(SendState.SENDING, send)))


def test_names_that_are_not_utf8_are_recorded_escaped(ledger: Ledger) -> None:
    name = b"1.2.\xff\xfe".decode("utf-8", "surrogateescape")
    ledger.apply(
        Transition(
            "1",
            name,
            StudyState.RECEIVING,
            instances=[InstanceRecord(f"/in/{name}/x", 1, 1, rejected_reason="bad")],
            events=[("ERROR", f"cannot read {name}")],
        )
    )
    (row,) = ledger.query("SELECT study_uid FROM studies")
    assert row["study_uid"] == "1.2.\\xff\\xfe"
    assert ledger.study_state("1", name) == (StudyState.RECEIVING, "")


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
    run = ledger.apply(
        Transition(
            "1",
            "1.2.3",
            StudyState.RUNNING,
            new_run=NewRun("annotate", "1.0", "d1", 1, node="node-a"),
        )
    ).run_id
    ledger.close()
    again = Ledger(path)  # a second open finds the column and changes nothing
    rows = again.query("SELECT run_id, node FROM runs ORDER BY run_id")
    assert [(r["run_id"], r["node"]) for r in rows] == [(1, ""), (run, "node-a")]
    again.close()
