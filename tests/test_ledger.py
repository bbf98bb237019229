"""Ledger: one transition per change, the legal-transition tables, recovery, durability.

The ledger's tests run against both backends: SQLite in STATE and a real PostgreSQL
(``tests/postgres.py``); those about an old SQLite file only against SQLite.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service import failpoints
from service.ledger import (
    MIGRATIONS,
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
from tests.conftest import free_port
from tests.postgres import PASSWORD, Postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        opened = Ledger(tmp_path / "STATE" / "ledger.sqlite3")
    else:
        opened = Ledger(request.getfixturevalue("postgres").database())
    yield opened
    opened.close()


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
    assert isinstance(caught.value.__cause__, (sqlite3.IntegrityError, psycopg.IntegrityError))
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
            events=[("ERROR", f"cannot read {name}: '\x00'")],
        )
    )
    (row,) = ledger.query("SELECT study_uid FROM studies")
    assert row["study_uid"] == "1.2.\\xff\\xfe"
    (event,) = ledger.query("SELECT message FROM events")  # PostgreSQL text holds no NUL
    assert event["message"].replace("\x00", "\\x00") == "cannot read 1.2.\\xff\\xfe: '\\x00'"
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


def test_old_ledger_records_its_schema_steps_once(tmp_path: Path) -> None:
    """A ledger from before ``schema_version`` gets every step recorded (the columns it
    lacks added); opening it again applies nothing."""
    path = tmp_path / "STATE" / "ledger.sqlite3"
    path.parent.mkdir()
    old = sqlite3.connect(path)
    old.executescript(OLD_RUNS)
    old.close()
    Ledger(path).close()
    first = sqlite3.connect(path).execute("SELECT version, applied FROM schema_version").fetchall()
    assert [v for v, _ in first] == [m.version for m in MIGRATIONS]
    Ledger(path).close()
    again = sqlite3.connect(path).execute("SELECT version, applied FROM schema_version").fetchall()
    assert again == first


# -- PostgreSQL only: the schema from empty, a lost connection, two nodes at once ------------


def test_postgresql_schema_from_empty_matches_sqlite(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.database()
    with psycopg.connect(url) as conn:  # an empty database: no table at all
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'").fetchone()
        assert Ledger.open_readonly(url) is None  # nothing to read yet
    pg, lite = Ledger(url), Ledger(tmp_path / "ledger.sqlite3")
    versions = [r["version"] for r in pg.query("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [m.version for m in MIGRATIONS]
    tables = [r["name"] for r in lite.query("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        if not table.startswith("sqlite_"):
            assert pg._columns(table) == lite._columns(table), table
    pg.close()
    again = Ledger(url)  # a second open applies nothing
    assert [r["version"] for r in again.query("SELECT version FROM schema_version")] == versions
    # 64-bit sizes and nanosecond times, bytes, doubles survive the trip
    again.apply(
        Transition(
            "1",
            "1.2.3",
            StudyState.RECEIVING,
            instances=[InstanceRecord("/in/x", 5 * 1024**3, 1_796_000_000_123_456_789)],
            listing=b"\x00\xff" * 16,
        )
    )
    (row,) = again.query("SELECT size, mtime_ns, updated FROM instances")
    assert (row["size"], row["mtime_ns"]) == (5 * 1024**3, 1_796_000_000_123_456_789)
    assert row["updated"] == again.query("SELECT updated FROM studies")[0]["updated"]
    assert isinstance(row["updated"], float) and row["updated"] % 1 != 0
    assert again.finished_listing("1", "1.2.3") == b"\x00\xff" * 16
    again.close()


def test_postgresql_two_ledgers_open_an_empty_database_at_once(postgres: Postgres) -> None:
    url = postgres.database()
    opened: list[Ledger] = []
    threads = [threading.Thread(target=lambda: opened.append(Ledger(url))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 4
    rows = opened[0].query("SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == [m.version for m in MIGRATIONS]  # each step once
    for ledger in opened:
        ledger.close()


def test_postgresql_restart_is_unavailable_then_reconnects(
    postgres: Postgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    ledger = Ledger(postgres.database())
    run = new_run(ledger)
    send = written(ledger, run, tmp_path)
    postgres.restart()  # every connection closed by the server
    sending = Transition(
        "1",
        "1.2.3",
        StudyState.SENDING,
        run_id=run,
        run=RunState.SENDING,
        send=SendChange(SendState.SENDING, send),
    )
    with pytest.raises(LedgerUnavailable) as caught:
        ledger.apply(sending)
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    assert "cannot be reached" in str(caught.value)
    assert ledger.apply(sending).send_id == send  # the next call connects again
    assert ledger.study_state("1", "1.2.3") == (StudyState.SENDING, "")
    assert [(s["send_id"], s["state"]) for s in ledger.sends(run)] == [(send, "sending")]
    assert [o["sop_instance_uid"] for o in ledger.outputs(run)] == ["1.2.9"]  # nothing lost
    postgres.restart()
    with pytest.raises(LedgerUnavailable):  # the read side too
        ledger.study_state("1", "1.2.3")
    assert ledger.study_state("1", "1.2.3") == (StudyState.SENDING, "")
    assert PASSWORD not in str(caught.value) + caplog.text
    ledger.close()


def test_postgresql_unreachable_names_the_url_without_its_password(postgres: Postgres) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(LedgerUnavailable) as caught:
        Ledger(url)
    assert PASSWORD not in str(caught.value)
    assert "postgres:********@127.0.0.1" in str(caught.value)


def queued_sends(ledger: Ledger, tmp_path: Path, count: int) -> list[tuple[str, int, int]]:
    """``count`` studies written, each with a queued send: (study, run, send)."""
    made = []
    for n in range(count):
        study = f"1.2.{n}"
        run = new_run(ledger, f"d{n}", study=study)
        send = ledger.apply(
            Transition(
                "1",
                study,
                StudyState.WRITTEN,
                run_id=run,
                run=RunState.WRITTEN,
                outputs=[
                    OutputRecord(tmp_path / f"{n}.dcm", "1.2.840.10008.5.1.4.1.1.7", f"9.{n}", "8")
                ],
                send=SendChange(SendState.QUEUED, destination="PACS@127.0.0.1:4242"),
            )
        ).send_id
        assert send is not None
        made.append((study, run, send))
    return made


def start_sending(study: str, run: int, send: int, node: str) -> Transition:
    return Transition(
        "1",
        study,
        StudyState.SENDING,
        f"sending from {node}",
        run_id=run,
        run=RunState.SENDING,
        send=SendChange(SendState.SENDING, send),
    )


def test_postgresql_two_nodes_race_for_each_send_and_one_wins(
    postgres: Postgres, tmp_path: Path
) -> None:
    """Two ledgers on one database (two nodes) open every queued send at once: each send is
    opened exactly once; the other node is refused (IllegalTransition), never both."""
    url = postgres.database()
    nodes = {"a": Ledger(url), "b": Ledger(url)}
    sends = queued_sends(nodes["a"], tmp_path, 30)
    won: dict[str, list[int]] = {"a": [], "b": []}
    refused: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def node(name: str) -> None:
        barrier.wait()
        for study, run, send in sends:
            try:
                nodes[name].apply(start_sending(study, run, send, name))
                won[name].append(send)
            except IllegalTransition:
                refused[name].append(send)

    threads = [threading.Thread(target=node, args=(name,)) for name in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = sorted(s for _, _, s in sends)
    assert sorted(won["a"] + won["b"]) == everything  # each opened once
    assert sorted(refused["a"] + refused["b"]) == everything  # and refused once
    assert not set(won["a"]) & set(won["b"])
    for study, _, send in sends:
        state, reason = nodes["b"].study_state("1", study)  # type: ignore[misc]
        winner = "a" if send in won["a"] else "b"
        assert (state, reason) == (StudyState.SENDING, f"sending from {winner}")
    for ledger in nodes.values():
        ledger.close()


def test_postgresql_a_concurrent_change_is_run_again_and_refused(
    postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node b changes the send while node a holds it, uncommitted: once a commits, b's
    transaction fails to serialise, runs again, sees a's change and is refused."""
    url = postgres.database()
    a, b = Ledger(url), Ledger(url)
    ((study, run, send),) = queued_sends(a, tmp_path, 1)
    a_holds, a_may_commit = threading.Event(), threading.Event()
    holder = threading.current_thread().name + "-a"

    def pause_a(name: str) -> None:
        if threading.current_thread().name == holder and name == "before-commit:sending":
            a_holds.set()
            assert a_may_commit.wait(60)

    monkeypatch.setattr(failpoints, "hit", pause_a)
    thread = threading.Thread(
        target=a.apply, args=(start_sending(study, run, send, "a"),), name=holder
    )
    thread.start()
    assert a_holds.wait(60)
    outcome: list[BaseException | None] = []

    def apply_b() -> None:
        try:
            b.apply(start_sending(study, run, send, "b"))
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    other = threading.Thread(target=apply_b)
    other.start()
    with psycopg.connect(url) as watch:  # b is waiting for a's row lock
        deadline = time.monotonic() + 60
        while not watch.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "b never waited for a's lock"
            time.sleep(0.02)
    a_may_commit.set()
    thread.join()
    other.join()
    assert len(outcome) == 1 and isinstance(outcome[0], IllegalTransition)
    assert a.study_state("1", study) == (StudyState.SENDING, "sending from a")
    a.close()
    b.close()


def test_claims_give_each_queued_send_to_exactly_one_of_two_nodes(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Two ledgers on one database (two nodes; on SQLite two processes on one STATE) claim
    queued sends in small batches at once: every send is claimed, each by one of them."""
    nodes = {"a": ledger, "b": Ledger(ledger.path)}
    sends = queued_sends(ledger, tmp_path, 30)
    got: dict[str, list[int]] = {"a": [], "b": []}
    failures: list[BaseException] = []
    barrier = threading.Barrier(2)

    def node(name: str) -> None:
        barrier.wait()
        try:
            while claimed := nodes[name].claim_queued_sends(
                2, lambda s: start_sending(s.study_uid, s.run_id, s.send_id, name)
            ):
                got[name].extend(s.send_id for s in claimed)
        except BaseException as exc:  # handed to the test thread
            failures.append(exc)

    threads = [threading.Thread(target=node, args=(name,)) for name in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sorted(got["a"] + got["b"]) == sorted(s for _, _, s in sends)  # each once
    for study, run, send in sends:
        winner = "a" if send in got["a"] else "b"
        assert ledger.study_state("1", study) == (StudyState.SENDING, f"sending from {winner}")
        assert [(s["send_id"], s["state"]) for s in ledger.sends(run)] == [(send, "sending")]
    assert ledger.claim_queued_sends(5, lambda s: start_sending("", 0, 0, "")) == []
    nodes["b"].close()


def test_a_claim_must_start_the_send_or_changes_nothing(ledger: Ledger, tmp_path: Path) -> None:
    ((study, run, send),) = queued_sends(ledger, tmp_path, 1)
    with pytest.raises(IllegalTransition):
        ledger.claim_queued_sends(
            1, lambda s: Transition("1", study, send=SendChange(SendState.ERROR, s.send_id))
        )
    assert [s["state"] for s in ledger.sends(run)] == ["queued"]
    (claimed,) = ledger.claim_queued_sends(1, lambda s: start_sending(study, run, send, "a"))
    assert (claimed.send_id, claimed.run_id, claimed.study_uid) == (send, run, study)


def test_a_lease_is_held_by_one_node_until_it_expires(ledger: Ledger) -> None:
    other = Ledger(ledger.path)  # a second node on the same ledger
    assert ledger.take_lease("intake:1", "a", 30)
    assert not other.take_lease("intake:1", "b", 30)  # a holds it
    assert ledger.take_lease("intake:1", "a", 30)  # a renews
    assert other.take_lease("intake:2", "b", 30)  # another lease is free
    assert [(x["name"], x["node"], x["live"]) for x in other.leases()] == [
        ("intake:1", "a", True),
        ("intake:2", "b", True),
    ]
    assert ledger.take_lease("intake:1", "a", -1)  # a's renewal already expired: a is dead
    assert [x["live"] for x in other.leases()] == [False, True]
    assert other.take_lease("intake:1", "b", 30)  # b takes it over
    assert not ledger.take_lease("intake:1", "a", 30)  # and a cannot take it back
    assert not ledger.release_lease("intake:1", "a")
    assert other.release_lease("intake:1", "b")
    assert ledger.take_lease("intake:1", "a", 30)
    other.close()


def test_heartbeats_name_the_live_nodes_and_their_roles(ledger: Ledger) -> None:
    first = ledger.heartbeat("gpu-1", ["run"])
    later = ledger.heartbeat("gpu-1", ["run", "send"])
    ledger.heartbeat("edge", ["intake", "run", "send"])
    nodes = {n["node"]: n for n in ledger.nodes()}
    assert nodes["gpu-1"]["roles"] == ["run", "send"] and nodes["gpu-1"]["started"] == first
    assert nodes["gpu-1"]["heartbeat"] == later >= first
    assert nodes["edge"]["roles"] == ["intake", "run", "send"]
    assert ledger.take_lease("intake:1", "edge", 30) and ledger.take_lease("intake:2", "edge", -1)
    nodes = {n["node"]: n for n in ledger.nodes()}
    assert (nodes["edge"]["leases"], nodes["gpu-1"]["leases"]) == (["intake:1"], [])  # live ones
    assert nodes["edge"]["age_s"] >= 0


def race_for_lease(nodes: list[Ledger], name: str) -> list[int]:
    """Every node tries to take ``name`` at once; the indexes of those that got it."""
    won: list[int] = []
    barrier = threading.Barrier(len(nodes))

    def take(index: int) -> None:
        barrier.wait()
        if nodes[index].take_lease(name, f"node-{index}", 30):
            won.append(index)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_nodes_racing_for_one_lease_one_gets_it(ledger: Ledger) -> None:
    nodes = [ledger, *(Ledger(ledger.path) for _ in range(3))]
    for n in range(10):
        won = race_for_lease(nodes, f"intake:{n}")
        assert len(won) == 1, won
        (holder,) = [x["node"] for x in ledger.leases() if x["name"] == f"intake:{n}"]
        assert holder == f"node-{won[0]}"
    for other in nodes[1:]:
        other.close()


def test_postgresql_a_node_recovers_its_own_sends_only(postgres: Postgres, tmp_path: Path) -> None:
    """Nodes a and b share a ledger: each ran two studies, opened one send and left one
    queued. Restarting, b interrupts the send b opened and takes b's queued send; a's stay."""
    url = postgres.database()
    nodes = {"a": Ledger(url, node="a"), "b": Ledger(url, node="b")}
    sends: dict[tuple[str, str], int] = {}
    for n, (name, opened) in enumerate([("a", True), ("b", True), ("a", False), ("b", False)]):
        ledger, study = nodes[name], f"1.2.{n}"
        run = ledger.apply(
            Transition(
                "1", study, StudyState.RUNNING, new_run=NewRun("m", "1", study, 1, node=name)
            )
        ).run_id
        send = ledger.apply(
            Transition(
                "1",
                study,
                StudyState.WRITTEN,
                run_id=run,
                run=RunState.WRITTEN,
                send=SendChange(SendState.QUEUED, destination="PACS@127.0.0.1:4242"),
            )
        ).send_id
        assert run is not None and send is not None
        if opened:
            ledger.apply(start_sending(study, run, send, name))
        sends[(name, "sending" if opened else "queued")] = send
    recovered = nodes["b"].recover()
    assert recovered.interrupted == 1
    assert [q.send_id for q in recovered.queued] == [sends[("b", "queued")]]
    states = {
        r["send_id"]: (r["state"], r["node"]) for r in nodes["a"].query("SELECT * FROM sends")
    }
    assert states[sends[("b", "sending")]] == ("interrupted", "b")
    assert states[sends[("a", "sending")]] == ("sending", "a")  # a's own: a decides
    recovered = nodes["a"].recover()
    assert recovered.interrupted == 1
    assert [q.send_id for q in recovered.queued] == [sends[("a", "queued")]]
    for ledger in nodes.values():
        ledger.close()
