"""The service on a PostgreSQL ledger (``[service] ledger``): the sample ends as on SQLite.

The ledger's own tests run on both backends in tests/test_ledger.py; here the whole service,
as a process, records in a real PostgreSQL (tests/postgres.py) and sends to a real pynetdicom
peer, and the CLI reads that ledger back.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pynetdicom import AllStoragePresentationContexts, evt

from devtools.sample import build_sample
from service.ledger import Ledger, NewRun, RunState, StudyState, Transition
from service.ledgerdb import PgRow
from service.supervision import InstanceLock
from service.values import FINAL_STUDY_STATES
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
    wait_service,
    write_config,
)
from tests.peers import Peer
from tests.postgres import PASSWORD, Postgres

ALL_STORAGE = tuple(str(c.abstract_syntax) for c in AllStoragePresentationContexts)


@pytest.fixture
def storing(start_peer: Callable[..., Peer]) -> tuple[Peer, list[str]]:
    """A storage SCP for every storage SOP class, and the SOP Instance UIDs it stored."""
    stored: list[str] = []

    def store(event: evt.Event) -> int:
        stored.append(stored_uid(event))
        return 0x0000

    return start_peer(on_store=store, sop_classes=ALL_STORAGE), stored


def serve_sample(root: Path, peer: Peer, ledger: str = "") -> tuple[Path, str]:
    """``serve --once`` on the project's sample under ``root``, sending to ``peer``."""
    build_sample(root / "INPUT")
    pacs = pacs_of(peer)
    config = write_config(root, pacs, stable=0.2, ledger=ledger, node_name="node-pg")
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "120"), 240)
    assert code == 0, log
    return config, log


def studies(config: Path) -> dict[tuple[str, str], tuple[str, str]]:
    listed = run_cli("--config", str(config), "studies", "--json")
    assert listed.returncode == 0, listed.stderr
    return {
        (r["gateway_id"], r["study_uid"]): (r["state"], r["reason"])
        for r in json.loads(listed.stdout)
    }


def history(config: Path, gateway_id: str, study_uid: str) -> list[Any]:
    """``study --json``: each run's state, outputs, sends and per-instance results."""
    shown = run_cli("--config", str(config), "study", gateway_id, study_uid, "--json")
    assert shown.returncode == 0, shown.stderr
    return [
        (
            run["state"],
            sorted(o["sop_instance_uid"] for o in run["outputs"]),
            [
                (s["state"], [(i["status"], i["status_code"]) for i in s["items"]])
                for s in run["sends"]
            ],
        )
        for run in json.loads(shown.stdout)["runs"]
    ]


def test_serve_once_on_postgresql_ends_as_on_sqlite(
    tmp_path: Path, postgres: Postgres, storing: tuple[Peer, list[str]]
) -> None:
    peer, stored = storing
    lite, _ = serve_sample(tmp_path / "lite", peer)
    on_sqlite, stored_sqlite = studies(lite), sorted(stored)
    stored.clear()

    url = postgres.database()
    config, log = serve_sample(tmp_path / "pg", peer, ledger=url)
    assert not (tmp_path / "pg/STATE/ledger.sqlite3").exists()  # recorded in PostgreSQL only
    on_postgres = studies(config)
    assert on_postgres == on_sqlite and len(on_postgres) == 2  # one study per sample gateway
    assert {state for state, _ in on_postgres.values()} <= {str(s) for s in FINAL_STUDY_STATES}
    assert sorted(stored) == stored_sqlite and len(set(stored)) == len(stored) > 0  # each once
    for gateway_id, study_uid in on_postgres:
        assert history(config, gateway_id, study_uid) == history(lite, gateway_id, study_uid)

    status = run_cli("--config", str(config), "status", "--json")
    assert status.returncode == 0, status.stderr
    report: dict[str, Any] = json.loads(status.stdout)
    assert report["ledger"] == url.replace(PASSWORD, "********")
    assert report["service"] == "ran"
    (node,) = report["nodes"]  # the service recorded itself in the shared ledger
    assert (node["node"], node["roles"], node["leases"]) == (
        "node-pg",
        ["intake", "run", "send"],
        [],
    )
    assert node["started"] <= node["heartbeat"] and node["age_s"] >= 0
    assert "nodes" not in json.loads(run_cli("--config", str(lite), "status", "--json").stdout)
    text = run_cli("--config", str(config), "status").stdout
    assert "node node-pg: intake,run,send; heartbeat " in text and "; no leases" in text
    shown = run_cli("--config", str(config), "config", "--show")
    assert shown.returncode == 0, shown.stderr
    for text in (log, status.stdout, shown.stdout, shown.stderr):
        assert PASSWORD not in text
    assert "postgres:********@127.0.0.1" in shown.stdout


def test_postgresql_rows_read_by_position_and_name() -> None:
    row = PgRow((1, "a"), ("run_id", "state"))
    assert (row[0], row["state"], tuple(row), dict(row)) == (
        1,
        "a",
        (1, "a"),
        {"run_id": 1, "state": "a"},
    )


def test_postgresql_restarted_during_a_run_stops_the_service_and_nothing_is_lost(
    tmp_path: Path, postgres: Postgres, storing: tuple[Peer, list[str]]
) -> None:
    """The server restarts while the service holds a transaction open (paused by a
    failpoint before a run's ``written`` commits): the service stops with exit 1 naming the
    ledger (password masked); started again, it finishes every study, each result sent once."""
    peer, stored = storing
    url = postgres.database()
    build_sample(tmp_path / "INPUT")
    pacs = pacs_of(peer)
    config = write_config(tmp_path, pacs, stable=0.2, ledger=url)
    paused = {"GATEWAY_FAILPOINTS": "before-commit:written=sleep:30"}
    proc = start_service(config, "--once", "--once-timeout", "120", env=paused)
    with psycopg.connect(url, autocommit=True) as watch:
        wait_for(
            lambda: bool(
                watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name='gateway'"
                    " AND state='idle in transaction'"
                    " AND now() - state_change > interval '1 second'"
                ).fetchone()[0]  # type: ignore[index]
            ),
            120,
            "the service paused inside a transaction",
        )
    postgres.restart()
    code, log = wait_service(proc, 120)
    assert code == 1, log
    assert "cannot be reached or written" in log and "postgres:********@127.0.0.1" in log
    assert PASSWORD not in log
    assert stored == []  # the paused run never committed: nothing was sent

    code, log = wait_service(start_service(config, "--once", "--once-timeout", "120"), 240)
    assert code == 0, log
    finished = studies(config)
    assert len(finished) == 2
    assert {state for state, _ in finished.values()} <= {str(s) for s in FINAL_STUDY_STATES}
    ledger = Ledger.open_readonly(url)
    assert ledger is not None
    outputs = ledger.query("SELECT sop_instance_uid FROM outputs o JOIN runs r USING (run_id)")
    ledger.close()
    assert sorted(stored) == sorted(r["sop_instance_uid"] for r in outputs)  # each once
    assert len(set(stored)) == len(stored) > 0


def _ledger_rows(url: str, sql: str) -> list[Any]:
    ledger = Ledger.open_readonly(url)
    if ledger is None:
        return []
    try:
        return [tuple(row) for row in ledger.query(sql)]
    finally:
        ledger.close()


def _intake_holders(url: str) -> dict[str, str]:
    """Gateway id → the node holding its live ``intake:<id>`` lease."""
    ledger = Ledger.open_readonly(url)
    if ledger is None:
        return {}  # no node has created the tables yet
    try:
        return {
            lease["name"].removeprefix("intake:"): lease["node"]
            for lease in ledger.leases()
            if lease["live"] and lease["name"].startswith("intake:")
        }
    finally:
        ledger.close()


def test_two_nodes_one_intake_lease_each_study_once_and_takeover_after_sigkill(
    tmp_path: Path, postgres: Postgres, storing: tuple[Peer, list[str]]
) -> None:
    """Two ``serve`` processes on one PostgreSQL ledger and the same INPUT/OUTPUT (each its
    own STATE): the first takes both gateways' ``intake:<id>`` leases, then gives one up to
    the second (a fair share each); each node runs its gateway's studies, each once, each
    result stored once; after node-a is SIGKILLed node-b takes its lease over when it
    expires and processes a study dropped afterwards (the takeover time is printed: at most
    the lease plus a third of it, one renewal, is expected)."""
    peer, stored = storing
    pacs = pacs_of(peer)
    url = postgres.database()
    for gateway_id in ("1", "2"):  # the sample's gateways, present before the nodes start
        (tmp_path / f"INPUT/gateway_{gateway_id}").mkdir(parents=True)
    configs = {}
    for name in ("node-a", "node-b"):
        (tmp_path / name).mkdir()
        configs[name] = write_config(
            tmp_path / name,
            pacs,
            stable=0.2,
            node_name=name,
            input_dir=str(tmp_path / "INPUT"),
            output_dir=str(tmp_path / "OUTPUT"),
            ledger=url,
            intake_lease_seconds=10,
        )
    # node-a pauses 3 s after each run starts: a node watching without the lease would see
    # the run ``running`` meanwhile and resume it, running and sending it twice
    paused = {"GATEWAY_FAILPOINTS": "after-commit:running=sleep:3"}
    first = start_service(configs["node-a"], env=paused)
    second = None
    try:
        wait_for(
            lambda: _intake_holders(url) == {"1": "node-a", "2": "node-a"},
            120,
            "node-a holding the intake of both gateways",
        )
        second = start_service(configs["node-b"])
        wait_for(
            lambda: ("node-b",) in _ledger_rows(url, "SELECT node FROM nodes"),
            120,
            "node-b's heartbeat",
        )
        wait_for(  # node-a gives one gateway up to node-b: one intake node each
            lambda: sorted(_intake_holders(url).values()) == ["node-a", "node-b"],
            60,
            "the intake spread over both nodes",
        )
        build_sample(tmp_path / "INPUT")  # both nodes watch it, each its gateway

        def final(count: int) -> bool:
            states = _ledger_rows(url, "SELECT state FROM studies")
            return len(states) == count and all(s in FINAL_STUDY_STATES for (s,) in states)

        wait_for(lambda: final(2), 120, "the sample's two studies final")
        runs = _ledger_rows(url, "SELECT gateway_id, study_uid, node FROM runs")
        assert len(runs) == 2 and {(g, s) for g, s, _ in runs} == set(
            _ledger_rows(url, "SELECT gateway_id, study_uid FROM studies")
        )  # each study run once
        # by the gateway's intake holder, or by the other node when it claimed the run
        # before the holder took its lease (node-a pauses after recording it)
        assert {node for _, _, node in runs} <= {"node-a", "node-b"}

        kill(first)  # SIGKILL: node-a's leases are no longer renewed
        killed = time.monotonic()
        wait_for(
            lambda: _intake_holders(url) == {"1": "node-b", "2": "node-b"},
            60,
            "node-b taking the intake over after node-a's leases expired",
        )
        print(f"intake taken over {time.monotonic() - killed:.1f} s after the SIGKILL")
        late, _ = copy_series(shared_file("series/mr-phantom-63"), tmp_path / "INPUT/gateway_2", 3)
        wait_for(lambda: final(3), 120, "the study dropped after the takeover final")
        runs = _ledger_rows(url, "SELECT gateway_id, study_uid, node FROM runs")
        assert len(runs) == 3
        assert [node for g, s, node in runs if s == late] == ["node-b"]
        code, log = stop_service(second)
        assert code == 0, log
        assert _intake_holders(url) == {}  # a clean stop gives its leases up
    finally:
        kill(first)
        if second is not None:
            kill(second)
    outputs = _ledger_rows(url, "SELECT sop_instance_uid FROM outputs")
    assert sorted(stored) == sorted(uid for (uid,) in outputs)  # every result stored once
    assert len(set(stored)) == len(stored) > 0


# -- ledger import: the SQLite ledger of a stopped service into an empty PostgreSQL one ----


def test_imported_sqlite_ledger_reads_the_same_and_nothing_is_sent_again(
    tmp_path: Path, postgres: Postgres, storing: tuple[Peer, list[str]]
) -> None:
    peer, stored = storing
    config, _ = serve_sample(tmp_path, peer)  # SQLite in tmp_path/STATE
    on_sqlite = run_cli("--config", str(config), "studies", "--json").stdout
    assert len(json.loads(on_sqlite)) == 2 and len(stored) > 0

    url = postgres.database()
    pacs = pacs_of(peer)
    config = write_config(tmp_path, pacs, stable=0.2, ledger=url, node_name="node-pg")
    source = tmp_path / "STATE/ledger.sqlite3"
    done = run_cli("--config", str(config), "ledger", "import", "--from", str(source))
    assert done.returncode == 0, done.stderr
    assert "postgres:********@127.0.0.1" in done.stdout and PASSWORD not in done.stdout
    copied = dict(line.split() for line in done.stdout.splitlines()[1:])
    assert copied["studies"] == "2" and int(copied["sends"]) >= 2 and int(copied["outputs"]) > 0
    assert run_cli("--config", str(config), "studies", "--json").stdout == on_sqlite

    sent, stored[:] = list(stored), []
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "120"), 240)
    assert code == 0, log
    assert stored == [] and len(set(sent)) == len(sent)  # each result stored once, in all
    assert run_cli("--config", str(config), "studies", "--json").stdout == on_sqlite
    with closing(Ledger(url)) as ledger:  # the identities go on past the imported ids
        assert ledger.query("SELECT nextval(pg_get_serial_sequence('runs', 'run_id'))")[0][0] > 2


def test_ledger_import_refuses_with_the_reason(tmp_path: Path, postgres: Postgres) -> None:
    url = postgres.database()
    config = write_config(tmp_path, ledger=url)
    source = tmp_path / "old/ledger.sqlite3"

    def refused(path: Path, conf: Path = config) -> str:
        done = run_cli("--config", str(conf), "ledger", "import", "--from", str(path))
        assert done.returncode == 2 and done.stdout == "", done
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert PASSWORD not in done.stderr and errors == done.stderr.splitlines()[-1:]
        return errors[0]

    assert "does not exist" in refused(source)
    source.parent.mkdir()
    source.write_text("not a database, but a text file\n" * 200)
    assert "is not a ledger" in refused(source)
    source.unlink()
    sqlite3.connect(source).execute("CREATE TABLE t (x)").connection.close()
    assert "is not a ledger: it has no table" in refused(source)
    source.unlink()
    old = Ledger(source)
    run = old.apply(Transition("1", "1.2.3", StudyState.RUNNING, new_run=NewRun("m", "1", "d", 1)))
    assert "1 run(s) running and 0 send(s) sending" in refused(source)
    old.apply(
        Transition("1", "1.2.3", StudyState.FAILED, "x", run_id=run.run_id, run=RunState.FAILED)
    )
    old.close()
    lock = InstanceLock(source.parent)  # as a running service holds it
    lock.acquire()
    assert "a service is serving" in refused(source)
    lock.release()
    (tmp_path / "lite").mkdir()
    sqlite_config = write_config(tmp_path / "lite")
    assert "is not PostgreSQL" in refused(source, sqlite_config)
    assert not (tmp_path / "lite/STATE").exists()

    with closing(Ledger(url)) as target:  # a node ran on it already
        target.add_gateway("9", tmp_path / "INPUT/gateway_9")
    assert "is not empty (gateways 1)" in refused(source)
    with closing(Ledger(url)) as target:
        assert target.query("SELECT COUNT(*) FROM studies")[0][0] == 0


def test_a_killed_services_ledger_is_refused_until_it_ran_once_more(
    tmp_path: Path, postgres: Postgres, start_peer: Callable[..., Peer]
) -> None:
    peer = start_peer(sop_classes=ALL_STORAGE)
    pacs = pacs_of(peer)
    for failpoint, left in (("running", "1 run(s) running"), ("sending", "1 send(s) sending")):
        root = tmp_path / failpoint
        build_sample(root / "INPUT")
        old = write_config(root, pacs, stable=0.2)
        killed = start_service(
            old, "--once", env={"GATEWAY_FAILPOINTS": f"after-commit:{failpoint}"}
        )
        assert wait_service(killed, 120)[0] == -9  # SIGKILLed at the failpoint
        (root / "pg").mkdir()
        new = write_config(root / "pg", ledger=postgres.database())
        source = str(root / "STATE/ledger.sqlite3")
        done = run_cli("--config", str(new), "ledger", "import", "--from", source)
        assert done.returncode == 2 and left in done.stderr and "serve --once" in done.stderr
        code, log = wait_service(start_service(old, "--once", "--once-timeout", "120"), 240)
        assert code == 0, log  # as the refusal says: once more on SQLite, then import
        done = run_cli("--config", str(new), "ledger", "import", "--from", source)
        assert done.returncode == 0, done.stderr
        on_postgres = studies(new)
        assert on_postgres == studies(old) and len(on_postgres) == 2
        assert {state for state, _ in on_postgres.values()} <= {str(s) for s in FINAL_STUDY_STATES}
