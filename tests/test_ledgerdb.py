"""The service on a PostgreSQL ledger (``[service] ledger``): the sample ends as on SQLite.

The ledger's own tests run on both backends in tests/test_ledger.py; here the whole service,
as a process, records in a real PostgreSQL (tests/postgres.py) and sends to a real pynetdicom
peer, and the CLI reads that ledger back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from pynetdicom import AllStoragePresentationContexts, evt

from devtools.sample import build_sample
from service.ledger import Ledger
from service.ledgerdb import PgRow
from service.values import FINAL_STUDY_STATES
from tests.helpers import (
    run_cli,
    start_service,
    stored_uid,
    wait_for,
    wait_service,
    write_config,
)
from tests.peers import Peer
from tests.postgres import PASSWORD, Postgres

ALL_STORAGE = tuple(str(c.abstract_syntax) for c in AllStoragePresentationContexts)


def serve_sample(root: Path, peer: Peer, ledger: str = "") -> tuple[Path, str]:
    """``serve --once`` on the project's sample under ``root``, sending to ``peer``."""
    build_sample(root / "INPUT")
    pacs = f'[pacs]\nhost = "127.0.0.1"\nport = {peer.port}\nae_title = "{peer.ae_title}"\n'
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
    tmp_path: Path, postgres: Postgres, start_peer: Callable[..., Peer]
) -> None:
    stored: list[str] = []

    def store(event: evt.Event) -> int:
        stored.append(stored_uid(event))
        return 0x0000

    peer = start_peer(on_store=store, sop_classes=ALL_STORAGE)
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
    tmp_path: Path, postgres: Postgres, start_peer: Callable[..., Peer]
) -> None:
    """The server restarts while the service holds a transaction open (paused by a
    failpoint before a run's ``written`` commits): the service stops with exit 1 naming the
    ledger (password masked); started again, it finishes every study, each result sent once."""
    stored: list[str] = []

    def store(event: evt.Event) -> int:
        stored.append(stored_uid(event))
        return 0x0000

    peer = start_peer(on_store=store, sop_classes=ALL_STORAGE)
    url = postgres.database()
    build_sample(tmp_path / "INPUT")
    pacs = f'[pacs]\nhost = "127.0.0.1"\nport = {peer.port}\nae_title = "{peer.ae_title}"\n'
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
