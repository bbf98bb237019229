"""Studies/s with 1, 2 and 3 nodes on PostgreSQL against one node on SQLite, on one workload.
``python bench/scale.py [--studies 30] [--repeat 1] [--ledger-studies 200]``.

The workload (tests/nodes.py): ``--studies`` studies of 2 CT images (pydicom's CT_small with
new UIDs) dealt over 3 gateways, the ``annotate`` model in each service process
(``workers = 0``), sent to one pynetdicom receiver that counts what it stores. Each round is
fresh (INPUT, OUTPUT, STATE, database): the nodes are started and wait until every node has
recorded its heartbeat and every gateway's intake is held; the studies are dropped at once
(files, then image.db rows) and the round lasts until every study is final. Rounds: one node
on SQLite (the baseline), then 1, 2 and 3 nodes doing everything on one PostgreSQL
(tests/postgres.py: Debian's server, loopback, fsync on), and 3 nodes laid out as in
docker-compose-scale.yml (one ``intake,send`` node, two ``run`` nodes that claim its runs).
For PostgreSQL rounds the database's committed transactions per study
(``pg_stat_database.xact_commit``: every write and every read, which run in autocommit) are
counted too; the bench waits on the receiver's count, not on the ledger, until every result
is stored, so that its own reads add at most a few transactions to a round.

The ledger's cost per study is bench/ledger.py's method in the same run: ``--ledger-studies``
synthetic studies through the 6 transitions of a sent study (and a read after each), on
SQLite and on PostgreSQL.

All nodes run on this one machine: on the 2-core bench machine they share 2 cores (and the
receiver and the database with them), so more nodes cannot add CPU here; the bench says so
in its output. See the README's Performance section for how it grows on N machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench.ledger import timed
from service.ledger import Ledger
from tests.nodes import Cluster, Receiver, Staged, drop, stage_studies
from tests.postgres import Postgres, start_postgres

GATEWAYS = ("1", "2", "3")
ALL = "intake,run,send"
#: (ledger, the roles of each node): the SQLite baseline, 1-3 nodes doing everything, and
#: the layout of docker-compose-scale.yml (one intake,send node, two run nodes)
Round = tuple[str, tuple[str, ...]]
ROUNDS: tuple[Round, ...] = (
    ("SQLite", (ALL,)),
    ("PostgreSQL", (ALL,)),
    ("PostgreSQL", (ALL, ALL)),
    ("PostgreSQL", (ALL, ALL, ALL)),
    ("PostgreSQL", ("intake,send", "run", "run")),
)


def label(backend: str, roles: tuple[str, ...]) -> str:
    """``SQLite | 1`` or ``PostgreSQL | 1 intake,send + 2 run``: the table's first cells."""
    if all(r == ALL for r in roles):
        return f"{backend} | {len(roles)}"
    counts = Counter(roles)
    return f"{backend} | " + " + ".join(f"{n} {r}" for r, n in counts.items())


def commits(url: str) -> int:
    """Transactions committed in the database so far (the statistics of every backend)."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_sleep(1.2)")  # other backends flush their counts each second
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname=%s", (name,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def one_round(
    folder: Path, server: Postgres | None, roles: tuple[str, ...], staged: list[Staged]
) -> tuple[float, float | None, str]:
    """Drop → every study final with one node per entry of ``roles`` (its roles): (seconds,
    transactions per study, runs per node)."""
    receiver = Receiver()
    url = server.database() if server is not None else ""
    names = [f"node-{n + 1}" for n in range(len(roles))]
    by_name = dict(zip(names, roles, strict=True))
    cluster = Cluster(folder, url, receiver, names, lease=30, gateways=GATEWAYS, roles=by_name)
    nodes = len(roles)
    try:
        cluster.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            gateways = cluster.query("SELECT gateway_id FROM gateways")
            ready = len(gateways) == len(GATEWAYS)
            if url:
                beats = cluster.query("SELECT node FROM nodes")
                ready = ready and len(beats) == nodes
                ready = ready and len(cluster.intake_holders()) == len(GATEWAYS)
            if ready:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{nodes} node(s) not ready within 120 s")
        before = commits(url) if url else 0
        dropped = time.monotonic()
        drop(staged, cluster.input)
        # the receiver tells when every result is stored, without a query of the ledger
        # (this bench's reads would count among the nodes' transactions); then the ledger
        # says when every study is final (a few reads at most)
        expected = sum(len(study.files) for study in staged)
        deadline = time.monotonic() + 600
        while sum(receiver.snapshot().values()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = cluster.wait_final(len(staged), 600, poll=0.05)
        seconds = ended - dropped
        per_study = (commits(url) - before) / len(staged) if url else None
        stored = receiver.snapshot()
        outputs = cluster.query("SELECT sop_instance_uid FROM outputs")
        states = Counter(cluster.states().values())
        if states != Counter({"sent": len(staged)}) or sorted(stored.elements()) != sorted(
            o["sop_instance_uid"] for o in outputs
        ):
            raise RuntimeError(f"round not clean: {states}, {len(stored)} stored")
        ran = Counter(r["node"] for r in cluster.query("SELECT node FROM runs"))
        return seconds, per_study, " ".join(f"{n}:{ran[n]}" for n in names)
    finally:
        codes = cluster.close()
        receiver.close()
        if any(code != 0 for code in codes.values()):
            print(f"  warning: exit codes {codes}")


def ledger_cost(server: Postgres, studies: int) -> tuple[float, float]:
    """bench/ledger.py's ms per study on SQLite and on PostgreSQL (one writer)."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-ledger-") as tmp:
        lite = Ledger(Path(tmp) / "ledger.sqlite3")
        lite_s = timed([lite], studies)
        lite.close()
    pg = Ledger(server.database())
    pg_s = timed([pg], studies)
    pg.close()
    return lite_s * 1000 / studies, pg_s * 1000 / studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ledger-studies", type=int, default=200)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(
        f"{args.studies} studies (2 CT images each, annotate) over {len(GATEWAYS)} gateways;"
        f" every node on this machine: the nodes share {cores} cores (and the receiver and"
        f" PostgreSQL with them). Load average at start {os.getloadavg()}"
    )
    rounds = list(ROUNDS)
    seconds: dict[Round, list[float]] = {r: [] for r in rounds}
    xacts: dict[Round, list[float]] = {r: [] for r in rounds}
    shares: dict[Round, list[str]] = {r: [] for r in rounds}
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    server = start_postgres()
    try:
        staged = stage_studies(root / "staging", args.studies, GATEWAYS)
        for repeat in range(args.repeat):
            for number, (backend, roles) in enumerate(rounds):
                folder = root / f"round-{number}-{repeat}"
                pg = server if backend == "PostgreSQL" else None
                s, x, ran = one_round(folder, pg, roles, staged)
                shares[(backend, roles)].append(ran)
                shutil.rmtree(folder, ignore_errors=True)
                seconds[(backend, roles)].append(s)
                if x is not None:
                    xacts[(backend, roles)].append(x)
                print(f"  {label(backend, roles)} (run {repeat + 1}): {s:.2f} s; runs {ran}")
        lite_ms, pg_ms = ledger_cost(server, args.ledger_studies)
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(seconds[ROUNDS[0]])
    print()
    print(
        "| ledger | nodes | drop → all final (median, range) | studies/s | ratio to SQLite x1 |"
        " ledger transactions / study | ledger ms / study (bench/ledger.py) | runs per node |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for backend, roles in rounds:
        times = seconds[(backend, roles)]
        s = statistics.median(times)
        spread = f" ({min(times):.2f}–{max(times):.2f})" if len(times) > 1 else ""
        counted = xacts[(backend, roles)]
        per_study = f"{statistics.median(counted):.1f}" if counted else "-"
        cost = lite_ms if backend == "SQLite" else pg_ms
        print(
            f"| {label(backend, roles)} | {s:.2f} s{spread} | {args.studies / s:.2f} |"
            f" {base / s:.2f} | {per_study} | {cost:.2f} | {' / '.join(shares[(backend, roles)])} |"
        )
    print(f"\nLoad average at the end {os.getloadavg()}; {cores} cores shared by every node.")


if __name__ == "__main__":
    main()
