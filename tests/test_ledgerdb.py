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

from pynetdicom import AllStoragePresentationContexts, evt

from devtools.sample import build_sample
from service.ledgerdb import PgRow
from service.values import FINAL_STUDY_STATES
from tests.helpers import run_cli, start_service, stored_uid, wait_service, write_config
from tests.peers import Peer
from tests.postgres import PASSWORD, Postgres

ALL_STORAGE = tuple(str(c.abstract_syntax) for c in AllStoragePresentationContexts)


def serve_sample(root: Path, peer: Peer, ledger: str = "") -> tuple[Path, str]:
    """``serve --once`` on the project's sample under ``root``, sending to ``peer``."""
    build_sample(root / "INPUT")
    pacs = f'[pacs]\nhost = "127.0.0.1"\nport = {peer.port}\nae_title = "{peer.ae_title}"\n'
    config = write_config(root, pacs, stable=0.2, ledger=ledger)
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

    status = run_cli("--config", str(config), "status", "--json")
    assert status.returncode == 0, status.stderr
    report: dict[str, Any] = json.loads(status.stdout)
    assert report["ledger"] == url.replace(PASSWORD, "********")
    assert report["service"] == "ran"
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
