"""Several nodes on one PostgreSQL ledger, in one process: run leases and fencing, runs and
sends taken over from a dead node, node roles, intake spread over the intake nodes.

Each node is an :class:`Engine` with its own STATE over the same INPUT and OUTPUT and one
real PostgreSQL (tests/postgres.py); results go to a real pynetdicom peer. A node that
stalls or dies is simulated by the state it leaves in the ledger (its lease run out, its
heartbeat old), written with plain SQL as a SIGKILL or a pause would leave it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pynetdicom import evt

from service.config import load_config
from service.engine import Engine
from service.errors import ConfigError
from service.ledger import (
    IllegalTransition,
    Ledger,
    NewRun,
    QueuedSend,
    RunState,
    SendChange,
    SendState,
    StudyState,
    Transition,
)
from service.models import build_models
from service.outbox import JOURNAL_NAME
from service.outbox import replay as replay_send_journal
from service.watcher import StudyWatcher
from tests.conftest import shared_file
from tests.helpers import (
    copy_series,
    kill,
    pacs_of,
    run_cli,
    start_service,
    stop_service,
    stored_uid,
    wait_for,
    write_config,
)
from tests.peers import Peer
from tests.postgres import Postgres


def sql(url: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Plain SQL on the test database: the state a stall or a SIGKILL leaves."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []


def expire(url: str, node: str, *, dead: bool = False) -> None:
    """``node``'s leases run out (it stalled past them); ``dead``: its heartbeat is old."""
    sql(url, "UPDATE leases SET expires = expires - 3600 WHERE node = %s", (node,))
    if dead:
        sql(url, "UPDATE nodes SET heartbeat = heartbeat - 3600 WHERE node = %s", (node,))


class Nodes:
    """Engines sharing INPUT, OUTPUT and one PostgreSQL ledger."""

    def __init__(self, root: Path, url: str, pacs: str) -> None:
        self.root, self.url, self.pacs = root, url, pacs
        self.engines: list[Engine] = []

    def start(
        self,
        name: str,
        roles: str = "intake,run,send",
        workers: int = 0,
        *,
        run_lease_seconds: float = 30.0,
        intake_lease_seconds: float = 30.0,
        max_batch: int = 8,
    ) -> Engine:
        (self.root / name).mkdir(exist_ok=True)  # a node started again keeps its STATE
        path = write_config(
            self.root / name,
            self.pacs,
            stable=0.1,
            workers=workers,
            node_name=name,
            input_dir=str(self.root / "INPUT"),
            output_dir=str(self.root / "OUTPUT"),
            ledger=self.url,
            roles=roles,
            run_lease_seconds=run_lease_seconds,
            intake_lease_seconds=intake_lease_seconds,
            max_batch=max_batch,
        )
        config = load_config(path, environ={})
        engine = Engine(config, build_models(config, load="run" in config.roles))
        engine.recover()
        engine.start()
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self.engines:
            engine.close()


@pytest.fixture
def stored(start_peer: Callable[..., Peer]) -> tuple[Peer, list[str]]:
    received: list[str] = []

    def store(event: evt.Event) -> int:
        received.append(stored_uid(event))
        return 0x0000

    return start_peer(on_store=store), received


def left_mid_run(url: str, run_id: int, expires: float) -> None:
    """The state a SIGKILL of node-a mid-run leaves: the run and its study ``running``,
    nothing written or sent, the run's lease held by node-a until ``expires``."""
    sql(url, "UPDATE runs SET state='running', finished=NULL")
    sql(url, "UPDATE studies SET state='running'")
    for table in ("outputs", "send_items", "sends", "finished_listings"):
        sql(url, f"DELETE FROM {table}")
    sql(url, "INSERT INTO leases VALUES (%s, 'node-a', %s)", (f"run:{run_id}", expires))


def held_peer(
    start_peer: Callable[..., Peer], seconds: float
) -> tuple[Peer, threading.Event, list[str]]:
    """A peer that holds each C-STORE until the event is set (at most ``seconds``), then
    stores it: the UIDs stored are appended to the list."""
    release = threading.Event()
    received: list[str] = []

    def hold(event: evt.Event) -> int:
        release.wait(seconds)
        received.append(stored_uid(event))
        return 0x0000

    return start_peer(on_store=hold), release, received


@pytest.fixture
def nodes(tmp_path: Path, postgres: Postgres, stored: tuple[Peer, list[str]]) -> Iterator[Nodes]:
    peer, _ = stored
    pacs = pacs_of(peer)
    (tmp_path / "INPUT").mkdir()
    group = Nodes(tmp_path, postgres.database(), pacs)
    yield group
    group.close()


def scan(engine: Engine) -> None:
    engine.discover()
    StudyWatcher(engine.config.input_dir, engine.touch, mode="polling").scan()


def tick_until(engines: list[Engine], done: Callable[[], bool], turns: int = 600) -> None:
    """Tick every engine in turn until ``done`` (each turn waits a little for work)."""
    for _ in range(turns):
        for engine in engines:
            engine.tick()
        if done():
            return
        time.sleep(0.05)
    raise AssertionError("the nodes did not get there")


def drop_study(nodes: Nodes, gateway: str = "1", limit: int = 2) -> str:
    study_uid, _ = copy_series(
        shared_file("series/ct-4-noise"), nodes.root / f"INPUT/gateway_{gateway}", limit
    )
    return study_uid


def sends_of(url: str) -> list[tuple[object, ...]]:
    return sql(url, "SELECT send_id, run_id, state, node FROM sends ORDER BY send_id")


# -- the ledger's part -----------------------------------------------------------------


def _running_run(ledger: Ledger) -> int:
    applied = ledger.apply(
        Transition(
            "1",
            "1.2.3",
            StudyState.RUNNING,
            new_run=NewRun("annotate", "1", "digest", 1, node=ledger.node),
        )
    )
    assert applied.run_id is not None
    return applied.run_id


def _written(run_id: int, fence: str) -> Transition:
    return Transition(
        "1",
        "1.2.3",
        StudyState.WRITTEN,
        "written",
        run_id=run_id,
        run=RunState.WRITTEN,
        send=SendChange(SendState.QUEUED, destination="PEER@127.0.0.1:104"),
        fence=fence,
    )


def test_an_outcome_is_recorded_only_under_its_run_lease(postgres: Postgres) -> None:
    """Fencing, in the outcome's own transaction: a node whose run lease another node took
    over (it stalled past it) has its outcome discarded, with an event; the node holding
    the lease records it, queues the one send and gives the lease up."""
    url = postgres.database()
    a, b = Ledger(url, "node-a"), Ledger(url, "node-b")
    try:
        run_id = _running_run(a)
        lease = f"run:{run_id}"
        assert a.claim_run(run_id, "node-a", 30)
        assert not b.claim_run(run_id, "node-b", 30)  # held, live
        expire(url, "node-a")  # node-a stalls past its lease
        assert b.claim_run(run_id, "node-b", 30)  # taken over
        assert not a.renew_lease(lease, "node-a", 30)  # node-a wakes up: lease lost
        discarded = a.apply(_written(run_id, lease))
        assert discarded.discarded and discarded.send_id is None
        assert a.get_run(run_id).state == RunState.RUNNING  # type: ignore[union-attr]
        applied = b.apply(_written(run_id, lease))
        assert not applied.discarded and applied.send_id is not None
        assert [s[0] for s in sends_of(url)] == [applied.send_id]  # exactly one send
        assert b.leases() == []  # released with the outcome
        # the stalled node again, after the run ended: discarded, still one send
        assert a.claim_run(run_id, "node-a", 30) is False  # not running any more
        assert "held by no node" in a.apply(_written(run_id, lease)).discarded
        assert a.take_lease(lease, "node-a", 30)  # even holding the lease again
        again = a.apply(_written(run_id, lease))
        assert "no longer running" in again.discarded
        assert len(sends_of(url)) == 1
        events = [e["message"] for e in a.study_history("1", "1.2.3")["events"]]  # type: ignore[index]
        assert sum("outcome discarded" in e for e in events) == 3
    finally:
        a.close()
        b.close()


def test_a_lease_run_out_but_not_taken_over_still_records(postgres: Postgres) -> None:
    """A node's own lease that ran out, no other node having taken it, still fences in;
    a transient failure (``waiting``, ``keep_lease``) is recorded and keeps the lease; it
    is fenced off like an outcome once another node holds the lease."""
    url = postgres.database()
    a, b = Ledger(url, "node-a"), Ledger(url, "node-b")
    try:
        run_id = _running_run(a)
        assert a.claim_run(run_id, "node-a", 30)
        waiting = Transition(
            "1",
            "1.2.3",
            StudyState.WAITING,
            "OUTPUT away; retry 1 in 5 s",
            run_id=run_id,
            fence=f"run:{run_id}",
            keep_lease=True,
        )
        assert not a.apply(waiting).discarded
        assert [(x["name"], x["node"]) for x in a.leases()] == [(f"run:{run_id}", "node-a")]
        assert not b.claim_run(run_id, "node-b", 30)  # kept, still live
        expire(url, "node-a")
        assert b.claim_run(run_id, "node-b", 30)
        assert "held by node node-b" in a.apply(waiting).discarded
        assert b.study_state("1", "1.2.3") == (StudyState.WAITING, "OUTPUT away; retry 1 in 5 s")
        expire(url, "node-b")
        assert a.claim_run(run_id, "node-a", 30)  # node-b stalled in turn: node-a takes it
        a.apply(Transition("1", "1.2.3", StudyState.RUNNING, f"run {run_id}, resumed"))
        expire(url, "node-a")  # no other node took it: the outcome is still this node's
        assert a.apply(_written(run_id, f"run:{run_id}")).send_id is not None
        assert a.leases() == []
    finally:
        a.close()
        b.close()


def test_a_dead_nodes_open_send_is_interrupted_once_and_never_resent(
    postgres: Postgres,
) -> None:
    url = postgres.database()
    a, b = Ledger(url, "node-a"), Ledger(url, "node-b")
    try:
        a.heartbeat("node-a", ("send",))
        b.heartbeat("node-b", ("send",))
        sending = []
        for ledger in (a, b):
            run_id = _running_run(ledger) if ledger is a else None
            if run_id is None:
                applied = b.apply(
                    Transition(
                        "1", "4.5.6", StudyState.RUNNING, new_run=NewRun("annotate", "1", "d", 1)
                    )
                )
                run_id, suid = applied.run_id, "4.5.6"
            else:
                suid = "1.2.3"
            assert run_id is not None
            queued = ledger.apply(
                Transition(
                    "1",
                    suid,
                    StudyState.WRITTEN,
                    run_id=run_id,
                    run=RunState.WRITTEN,
                    send=SendChange(SendState.QUEUED, destination="PEER@127.0.0.1:104"),
                )
            )
            send = QueuedSend(queued.send_id or 0, run_id, "1", suid)
            ledger.apply(
                Transition(
                    "1",
                    suid,
                    StudyState.SENDING,
                    run_id=run_id,
                    run=RunState.SENDING,
                    send=SendChange(SendState.SENDING, send.send_id),
                )
            )
            sending.append(send)
        expire(url, "node-a", dead=True)
        assert b.interrupt_dead_sends(30) == 1  # node-a's; node-b's own, live, stays open
        assert b.interrupt_dead_sends(30) == 0
        states = {s[0]: (s[2], s[3]) for s in sends_of(url)}
        assert states == {
            sending[0].send_id: ("interrupted", "node-a"),
            sending[1].send_id: ("sending", "node-b"),
        }
        assert b.study_state("1", "1.2.3")[0] == StudyState.SEND_FAILED  # type: ignore[index]
        assert b.queued_sends() == []  # nothing queued again: never resent by itself
    finally:
        a.close()
        b.close()


# -- nodes as engines --------------------------------------------------------------------


def test_a_stalled_nodes_run_taken_over_its_outcome_discarded_one_send(
    nodes: Nodes, stored: tuple[Peer, list[str]]
) -> None:
    """Node A's run is in its worker when A stalls past its run lease; node B takes the
    run over, finishes it (same generation, same output UIDs) and sends it; when A wakes
    up its outcome is discarded: one send, each instance stored once."""
    _, received = stored
    study_uid = drop_study(nodes)
    a = nodes.start("node-a", workers=1)  # a real worker: the run stays in flight
    scan(a)
    tick_until([a], lambda: a.busy)
    (run,) = a.ledger.runs()
    assert run.state == RunState.RUNNING
    assert f"run:{run.run_id}" in {x["name"] for x in a.ledger.leases()}
    expire(nodes.url, "node-a")  # A stalls: its run lease runs out
    b = nodes.start("node-b")
    tick_until([b], lambda: b.ledger.get_run(run.run_id).state != RunState.RUNNING)  # type: ignore[union-attr]
    assert b.ledger.get_run(run.run_id).node == "node-b"  # type: ignore[union-attr]
    uids = {o["sop_instance_uid"] for o in b.ledger.outputs(run.run_id)}
    assert len(uids) == 2
    assert a.drain(60)  # A wakes up: its outcome comes in, and is discarded
    assert b.drain(30)
    history = a.ledger.study_history("1", study_uid)
    assert history is not None
    assert [r["state"] for r in history["runs"]] == ["sent"]
    assert len(history["runs"][0]["sends"]) == 1  # exactly one send
    assert any("outcome discarded" in e["message"] for e in history["events"])
    assert {o["sop_instance_uid"] for o in a.ledger.outputs(run.run_id)} == uids
    assert sorted(received) == sorted(uids)  # each instance stored once


def test_a_dead_nodes_run_is_claimed_by_another_with_the_same_uids(
    nodes: Nodes, stored: tuple[Peer, list[str]]
) -> None:
    """A run left ``running`` by a node that died (its lease run out) is claimed by a node
    with the ``run`` role, rebuilt from its folder and finished with the same generation:
    the same output UIDs as the first node wrote."""
    _, received = stored
    study_uid = drop_study(nodes)
    a = nodes.start("node-a")
    scan(a)
    assert a.drain(30)
    (run,) = a.ledger.runs()
    first = {o["sop_instance_uid"] for o in a.ledger.outputs(run.run_id)}
    left_mid_run(nodes.url, run.run_id, expires=0)  # node-a's lease run out
    received.clear()
    b = nodes.start("node-b", roles="run,send")
    tick_until([b], lambda: b.ledger.study_state("1", study_uid)[0] == StudyState.SENT)  # type: ignore[index]
    (again,) = b.ledger.runs()
    assert (again.run_id, again.generation, again.node) == (run.run_id, 0, "node-b")
    assert {o["sop_instance_uid"] for o in b.ledger.outputs(run.run_id)} == first
    assert sorted(received) == sorted(first)


def test_a_node_restarted_after_a_kill_resumes_its_own_run_once(
    nodes: Nodes, stored: tuple[Peer, list[str]]
) -> None:
    """One node on PostgreSQL, killed mid-run (its run ``running``, its lease still its
    own) and started again: the run is resumed once (by the scan or by a claim, not both),
    with the same output UIDs, and sent once."""
    _, received = stored
    study_uid = drop_study(nodes)
    a = nodes.start("node-a")
    scan(a)
    assert a.drain(30)
    (run,) = a.ledger.runs()
    first = {o["sop_instance_uid"] for o in a.ledger.outputs(run.run_id)}
    a.close()
    nodes.engines.remove(a)
    left_mid_run(nodes.url, run.run_id, expires=1e12)  # node-a's lease still its own
    received.clear()
    again = nodes.start("node-a")
    scan(again)
    assert again.drain(30)
    history = again.ledger.study_history("1", study_uid)
    assert history is not None and [r["state"] for r in history["runs"]] == ["sent"]
    assert len(history["runs"][0]["sends"]) == 1
    assert not any("outcome discarded" in e["message"] for e in history["events"])
    assert sorted(received) == sorted(first)


def test_inputs_changed_since_the_run_started_are_left_to_intake(nodes: Nodes) -> None:
    drop_study(nodes, limit=1)
    a = nodes.start("node-a", roles="intake,send")  # records the run, executes nothing
    scan(a)
    tick_until([a], lambda: bool(a.ledger.runs()))
    (run,) = a.ledger.runs()
    drop_study(nodes, limit=2)  # a second file arrives after the run was recorded
    b = nodes.start("node-b", roles="run")
    for _ in range(3):
        b.tick()
    assert b.ledger.get_run(run.run_id).state == RunState.RUNNING  # type: ignore[union-attr]
    assert not b.busy and b.ledger.leases() == [
        x for x in b.ledger.leases() if x["name"].startswith("intake:")
    ]


def test_roles_intake_run_and_send_on_three_nodes(
    nodes: Nodes, stored: tuple[Peer, list[str]]
) -> None:
    """An intake-only node records the run and starts no worker nor model; a run-only
    node executes it and opens no association; a send-only node claims the queued send
    recorded by the other node and sends it. Heartbeats name each node's roles."""
    _, received = stored
    study_uid = drop_study(nodes)
    intake = nodes.start("intake", roles="intake", workers=1)
    runner = nodes.start("runner", roles="run")
    sender = nodes.start("sender", roles="send")
    scan(intake)
    scan(runner)  # a node without intake drops what it is shown
    assert runner.pending_count == 0 and intake.pending_count == 1
    all_three = [intake, runner, sender]
    tick_until(all_three, lambda: bool(intake.ledger.runs()))
    assert not intake._pipeline.started or intake._pipeline.in_flight == 0
    assert intake._pipeline._pool is None  # no worker process started
    tick_until(
        all_three,
        lambda: intake.ledger.study_state("1", study_uid)[0] == StudyState.SENT,  # type: ignore[index]
    )
    (run,) = intake.ledger.runs()
    assert run.node == "runner"
    assert sends_of(nodes.url)[0][3] == "sender"  # opened by the send node
    assert len(received) == 2
    roles = {n["node"]: n["roles"] for n in intake.ledger.nodes()}
    assert roles == {"intake": ["intake"], "runner": ["run"], "sender": ["send"]}
    assert [lease["name"] for lease in intake.ledger.leases()] == ["intake:1"]


def _three_runs_recorded(nodes: Nodes) -> Engine:
    """An intake-only node that has recorded 3 runs (one study on each of 3 gateways)."""
    for gateway in ("1", "2", "3"):
        drop_study(nodes, gateway)
    intake = nodes.start("intake", roles="intake")
    scan(intake)
    tick_until([intake], lambda: len(intake.ledger.runs()) == 3)
    return intake


def test_a_run_node_claims_as_many_runs_as_its_pipeline_has_room_for(nodes: Nodes) -> None:
    """A run-only node (workers = 0, max_batch 8) claims every claimable run in one look
    (a batch's worth), not one per look."""
    intake = _three_runs_recorded(nodes)
    runner = nodes.start("runner", roles="run")
    runner.tick()
    assert [(r.node, r.state) for r in intake.ledger.runs()] == [("runner", RunState.WRITTEN)] * 3


def test_a_run_node_that_found_work_looks_again_when_a_run_completes(nodes: Nodes) -> None:
    """Room for one run at a time (max_batch 1): after a run completes, a node whose last
    look found work claims the next at once, without waiting for the next second (the
    turns here all happen at one instant of the engine's clock)."""
    intake = _three_runs_recorded(nodes)
    runner = nodes.start("runner", roles="run", max_batch=1)
    now = time.monotonic()
    written = []
    for _ in range(3):
        runner.tick(now)
        written.append(sum(r.state == RunState.WRITTEN for r in intake.ledger.runs()))
    assert written == [1, 2, 3]
    runner.tick(now)  # the look after the last run completed finds nothing claimable
    assert not runner._claim_found


def test_intake_spreads_over_three_nodes_and_a_dead_nodes_gateways_are_taken(
    nodes: Nodes,
) -> None:
    for gateway in ("1", "2", "3"):
        (nodes.root / f"INPUT/gateway_{gateway}").mkdir()
    engines = [nodes.start(f"node-{n}") for n in "abc"]

    def holders() -> dict[str, str]:
        return {
            x["name"].removeprefix("intake:"): x["node"]
            for x in engines[0].ledger.leases()
            if x["live"] and x["name"].startswith("intake:")
        }

    for _ in range(3):  # a few renewals: the first node takes all, then gives some up
        for engine in engines:
            engine.discover()
    assert sorted(holders().values()) == ["node-a", "node-b", "node-c"]
    expire(nodes.url, "node-c", dead=True)  # node-c dies: its lease and heartbeat age
    for _ in range(2):
        for engine in engines[:2]:
            engine.discover()
    assert set(holders()) == {"1", "2", "3"}
    assert sorted(set(holders().values())) == ["node-a", "node-b"]


def test_roles_other_than_all_need_postgresql(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"service\.roles.*PostgreSQL"):
        load_config(write_config(tmp_path, roles="run"), environ={})
    with pytest.raises(ConfigError, match=r"service\.roles"):
        load_config(write_config(tmp_path, roles="run,dance"), environ={})
    with pytest.raises(ConfigError, match=r"service\.run_lease_seconds"):
        load_config(write_config(tmp_path, run_lease_seconds=0.5), environ={})
    config = load_config(write_config(tmp_path), environ={"GATEWAY_ROLES": "intake,run,send"})
    assert config.roles == ("intake", "run", "send") and config.run_lease_seconds == 30
    result = run_cli("serve", "--role", "run", "--config", str(tmp_path / "gateway.toml"))
    assert result.returncode == 2
    assert "--role" in result.stderr and "PostgreSQL" in result.stderr


def test_serve_role_intake_and_serve_role_run_send_as_processes(
    tmp_path: Path, postgres: Postgres, stored: tuple[Peer, list[str]]
) -> None:
    """``serve --role intake`` watches and records the run but starts no worker and loads
    no model; ``serve --role run,send`` neither watches nor scans, and executes and sends
    the run; ``status --json`` lists both nodes with their roles."""
    peer, received = stored
    pacs = pacs_of(peer)
    url = postgres.database()
    (tmp_path / "INPUT/gateway_1").mkdir(parents=True)
    configs = {}
    for name in ("front", "back"):
        (tmp_path / name).mkdir()
        configs[name] = write_config(
            tmp_path / name,
            pacs,
            stable=0.2,
            workers=1,
            node_name=name,
            input_dir=str(tmp_path / "INPUT"),
            output_dir=str(tmp_path / "OUTPUT"),
            ledger=url,
        )
    front = start_service(configs["front"], "--role", "intake")
    back = start_service(configs["back"], "--role", "run,send")
    try:
        study_uid, _ = copy_series(
            shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_1", 2
        )

        def state() -> str:
            try:
                rows = sql(url, "SELECT state FROM studies WHERE study_uid = %s", (study_uid,))
            except psycopg.errors.UndefinedTable:  # no node has created the tables yet
                return ""
            return str(rows[0][0]) if rows else ""

        wait_for(lambda: state() == "sent", 120, "the study sent")
        status = run_cli("status", "--json", "--config", str(configs["front"]))
        assert status.returncode == 0, status.stderr
        roles = {n["node"]: n["roles"] for n in json.loads(status.stdout)["nodes"]}
        assert roles == {"front": ["intake"], "back": ["run", "send"]}
    finally:
        code_front, log_front = stop_service(front)
        code_back, log_back = stop_service(back)
        kill(front)
        kill(back)
    assert code_front == 0 and code_back == 0, log_front + log_back
    assert sql(url, "SELECT node FROM runs") == [("back",)]
    assert sql(url, "SELECT node FROM sends") == [("back",)]
    assert len(received) == 2
    assert "roles=intake" in log_front and "worker process(es) ready" not in log_front
    assert "routed only" in log_front
    assert "watch=none" in log_back and "roles=run,send" in log_back


def test_sqlite_one_node_takes_no_lease_and_records_no_node(tmp_path: Path) -> None:
    """On SQLite nothing of the above is used: no run lease, no heartbeat, no fence, and
    every role is this node's."""
    copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_1", limit=2)
    config = load_config(write_config(tmp_path), environ={})
    engine = Engine(config, build_models(config))
    try:
        engine.recover()
        scan(engine)
        assert engine.drain(30)
        assert [str(r.state) for r in engine.ledger.runs()] == ["written"]
        assert engine.ledger.leases() == [] and engine.ledger.nodes() == []
        assert engine.roles == {"intake", "run", "send"}
    finally:
        engine.close()


def test_a_send_open_on_a_node_gone_silent_is_interrupted_by_another_and_never_resent(
    tmp_path: Path, postgres: Postgres, start_peer: Callable[..., Peer]
) -> None:
    """Node A opens a send that the PACS holds; A's heartbeat goes old (dead or stalled):
    node B records the send ``interrupted`` (study ``send_failed``) and queues nothing.
    When A's association ends after all, A records its real outcome on that same send
    (interrupted -> success, run and study sent), with an event; nothing is sent again."""
    peer, release, received = held_peer(start_peer, 30)
    pacs = pacs_of(peer)
    (tmp_path / "INPUT").mkdir()
    group = Nodes(tmp_path, postgres.database(), pacs)
    try:
        study_uid = drop_study(group)
        a = group.start("node-a")
        scan(a)
        tick_until([a], lambda: [s[2] for s in sends_of(group.url)] == ["sending"])
        expire(group.url, "node-a", dead=True)
        b = group.start("node-b", roles="run,send")
        tick_until([b], lambda: [s[2] for s in sends_of(group.url)] == ["interrupted"])
        assert b.ledger.study_state("1", study_uid)[0] == StudyState.SEND_FAILED  # type: ignore[index]
        release.set()
        assert a.drain(30) and b.drain(5)
        history = a.ledger.study_history("1", study_uid)
        assert history is not None
        assert [(s["state"], s["send_id"]) for s in history["runs"][0]["sends"]] == [
            ("success", sends_of(group.url)[0][0])
        ]
        assert sends_of(group.url)[0][3] == "node-a"
        assert history["runs"][0]["state"] == RunState.SENT
        assert history["state"] == StudyState.SENT
        assert any("after it was recorded interrupted" in e["message"] for e in history["events"])
        assert len(received) == 2  # stored once: the record now says so
    finally:
        release.set()
        group.close()


def test_a_late_outcome_only_by_the_opening_node_and_only_as_late(postgres: Postgres) -> None:
    """An ``interrupted`` send changes to its real outcome only through
    ``apply_late_send`` by the node that opened it; a plain transition, or another node,
    is refused; a study that moved on meanwhile keeps its state."""
    url = postgres.database()
    a, b = Ledger(url, "node-a"), Ledger(url, "node-b")
    try:
        a.heartbeat("node-a", ("send",))
        run_id = _running_run(a)
        send_id = a.apply(_written(run_id, "")).send_id
        assert send_id is not None
        opening = Transition(
            "1",
            "1.2.3",
            StudyState.SENDING,
            run_id=run_id,
            run=RunState.SENDING,
            send=SendChange(SendState.SENDING, send_id),
        )
        a.apply(opening)
        sql(url, "UPDATE nodes SET heartbeat = heartbeat - 3600 WHERE node = 'node-a'")
        assert b.interrupt_dead_sends(30) == 1
        outcome = Transition(
            "1",
            "1.2.3",
            StudyState.SENT,
            "success",
            run_id=run_id,
            run=RunState.SENT,
            run_reason="",
            send=SendChange(SendState.SUCCESS, send_id),
        )
        with pytest.raises(IllegalTransition):
            a.apply(outcome)  # not as a plain transition
        with pytest.raises(IllegalTransition):
            b.apply_late_send(outcome)  # not by another node
        a.apply(Transition("1", "1.2.3", StudyState.RECEIVING, "new files"))
        a.apply_late_send(outcome)
        assert sends_of(url)[0][2:] == ("success", "node-a")
        assert a.get_run(run_id).state == RunState.SENT  # type: ignore[union-attr]
        assert a.study_state("1", "1.2.3")[0] == StudyState.RECEIVING  # type: ignore[index]
        with pytest.raises(IllegalTransition):
            a.apply_late_send(outcome)  # once
    finally:
        a.close()
        b.close()


def test_a_node_whose_turn_is_slow_stays_live_its_send_is_not_interrupted(
    tmp_path: Path, postgres: Postgres, start_peer: Callable[..., Peer]
) -> None:
    """Node A opens a send, then its engine turn blocks (A is not ticked) for more than
    twice ``run_lease_seconds``: its heartbeat thread keeps it live, so node B does not
    record the send interrupted, and A records the send's outcome when its turn goes on.
    When A's loop is dead (its last turn too old), the thread stops beating: B then
    takes A for gone."""
    peer, release, received = held_peer(start_peer, 60)
    pacs = pacs_of(peer)
    (tmp_path / "INPUT").mkdir()
    group = Nodes(tmp_path, postgres.database(), pacs)
    lease = 1.5
    loop_age = [0.0]
    try:
        study_uid = drop_study(group)
        a = group.start("node-a", run_lease_seconds=lease, intake_lease_seconds=lease)
        a.start_node_beat(lambda: loop_age[0])
        scan(a)
        tick_until([a], lambda: [s[2] for s in sends_of(group.url)] == ["sending"])
        b = group.start("node-b", roles="run,send", run_lease_seconds=lease)
        beat = a.node_beat
        assert beat is not None
        first = beat.beats
        # A's turn is blocked: only B ticks, until A's thread has beaten over 2 leases
        tick_until([b], lambda: beat.beats >= first + 2 * lease / beat.every + 2)
        assert [s[2] for s in sends_of(group.url)] == ["sending"]
        release.set()
        tick_until([a, b], lambda: [s[2] for s in sends_of(group.url)] == ["success"])
        assert a.ledger.study_state("1", study_uid)[0] == StudyState.SENT  # type: ignore[index]
        assert len(received) == 2
        # the loop dead: no heartbeat any more, the node ages out
        loop_age[0] = 10 * lease
        stopped = beat.beats
        tick_until([b], lambda: "node-a" not in b.ledger.live_nodes("send", lease))
        assert beat.beats == stopped
        a.close()
        assert not beat.is_alive()  # stops with the service
    finally:
        release.set()
        group.close()


def _open_send(ledger: Ledger, study: str) -> QueuedSend:
    """A run of ``study`` written, its send opened (``sending``) by ``ledger``'s node."""
    run_id = ledger.apply(
        Transition("1", study, StudyState.RUNNING, new_run=NewRun("annotate", "1", study, 1))
    ).run_id
    assert run_id is not None
    queued = Transition(
        "1",
        study,
        StudyState.WRITTEN,
        run_id=run_id,
        run=RunState.WRITTEN,
        send=SendChange(SendState.QUEUED, destination="PEER@127.0.0.1:104"),
    )
    send_id = ledger.apply(queued).send_id
    assert send_id is not None
    opening = Transition(
        "1",
        study,
        StudyState.SENDING,
        run_id=run_id,
        run=RunState.SENDING,
        send=SendChange(SendState.SENDING, send_id),
    )
    ledger.apply(opening)
    return QueuedSend(send_id, run_id, "1", study, False)


def test_send_outcomes_kept_in_the_journal_are_recorded_at_the_next_start(
    tmp_path: Path, postgres: Postgres
) -> None:
    """``STATE/send-journal.json`` (written when the ledger went away with sends open): at
    the next start a send still ``sending`` gets its outcome, one another node recorded
    ``interrupted`` meanwhile gets its real one, and nothing is left for ``recover``."""
    url = postgres.database()
    a, b = Ledger(url, "node-a"), Ledger(url, "node-b")
    try:
        a.heartbeat("node-a", ("send",))
        late = _open_send(a, "1.2.4")
        sql(url, "UPDATE nodes SET heartbeat = heartbeat - 3600 WHERE node = 'node-a'")
        assert b.interrupt_dead_sends(30) == 1  # node-a looked gone
        still_open = _open_send(a, "1.2.3")
        entries = [
            {
                "send_id": s.send_id,
                "run_id": s.run_id,
                "gateway_id": "1",
                "study_uid": s.study_uid,
                "manual": False,
                "status": "success",
                "reason": "",
                "items": [["1.2.3.9", "success", 0, "/out/x.dcm"]],
            }
            for s in (late, still_open)
        ]
        (tmp_path / JOURNAL_NAME).write_text(json.dumps(entries))
        assert [s[2] for s in sends_of(url)] == ["interrupted", "sending"]
        assert replay_send_journal(a, tmp_path) == 2
        assert not (tmp_path / JOURNAL_NAME).exists()
        assert [s[2:] for s in sends_of(url)] == [("success", "node-a")] * 2
        for send in (late, still_open):
            assert a.study_state("1", send.study_uid)[0] == StudyState.SENT  # type: ignore[index]
        assert a.recover().interrupted == 0
        assert replay_send_journal(a, tmp_path) == 0  # no journal: nothing
    finally:
        a.close()
        b.close()
