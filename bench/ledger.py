"""The ledger's cost per study on each backend. ``python bench/ledger.py [--studies 300]``.

Each study goes through the transitions the service applies to a study that is sent: seen
(2 instances recorded), ready, running (a new run), written (2 outputs, a queued send),
sending, sent (2 per-instance results) and a reader's ``study_state`` between each: 6
transactions and 6 reads. Rounds, on the same code and workload in this run: SQLite in a
temporary STATE (the baseline), PostgreSQL (Debian's server from tests/postgres.py, on
loopback, fsync on) with one writer, and PostgreSQL with two writers (two ``Ledger`` objects,
two threads: two nodes) on disjoint studies. Prints ms per study and studies/s, with ratios
to SQLite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.ledger import (
    InstanceRecord,
    Ledger,
    NewRun,
    OutputRecord,
    RunState,
    SendChange,
    SendState,
    StudyState,
    Transition,
)
from tests.postgres import start_postgres

SC = "1.2.840.10008.5.1.4.1.1.7"


def one_study(ledger: Ledger, gateway: str, study: str) -> None:
    files = [InstanceRecord(f"/in/{study}/{n}", 1000, 1, "x" * 64, f"{study}.{n}") for n in (1, 2)]
    steps = [Transition(gateway, study, StudyState.RECEIVING, instances=files)]
    steps.append(Transition(gateway, study, StudyState.READY))
    for step in steps:
        ledger.apply(step)
        ledger.study_state(gateway, study)
    run = ledger.apply(
        Transition(gateway, study, StudyState.RUNNING, new_run=NewRun("annotate", "1", study, 2))
    ).run_id
    ledger.study_state(gateway, study)
    outputs = [OutputRecord(Path(f"/out/{study}/{n}"), SC, f"{study}.9{n}", "9") for n in (1, 2)]
    send = ledger.apply(
        Transition(
            gateway,
            study,
            StudyState.WRITTEN,
            run_id=run,
            run=RunState.WRITTEN,
            outputs=outputs,
            send=SendChange(SendState.QUEUED, destination="PACS"),
        )
    ).send_id
    ledger.study_state(gateway, study)
    ledger.apply(
        Transition(
            gateway,
            study,
            StudyState.SENDING,
            run_id=run,
            run=RunState.SENDING,
            send=SendChange(SendState.SENDING, send),
        )
    )
    ledger.study_state(gateway, study)
    items = [(o.sop_instance_uid, "success", 0) for o in outputs]
    ledger.apply(
        Transition(
            gateway,
            study,
            StudyState.SENT,
            run_id=run,
            run=RunState.SENT,
            send=SendChange(SendState.SUCCESS, send, items=items),
        )
    )
    ledger.study_state(gateway, study)


def timed(ledgers: list[Ledger], studies: int) -> float:
    """Seconds for ``studies`` studies shared out among ``ledgers`` (one thread each)."""

    def work(index: int) -> None:
        for n in range(index, studies, len(ledgers)):
            one_study(ledgers[index], "1", f"1.2.{n}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ledgers))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=300)
    args = parser.parse_args()
    n = args.studies
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        lite = Ledger(Path(tmp) / "STATE" / "ledger.sqlite3")
        sqlite_s = timed([lite], n)
        lite.close()
    server = start_postgres()
    try:
        one = Ledger(server.database())
        pg_s = timed([one], n)
        one.close()
        url = server.database()
        two = [Ledger(url), Ledger(url)]
        pg2_s = timed(two, n)
        for ledger in two:
            ledger.close()
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
    print(f"{n} studies, 6 transitions and 6 reads each:")
    for name, seconds in (
        ("SQLite (baseline)", sqlite_s),
        ("PostgreSQL, 1 writer", pg_s),
        ("PostgreSQL, 2 writers", pg2_s),
    ):
        print(
            f"  {name:<22} {seconds * 1000 / n:6.2f} ms/study  {n / seconds:7.1f} studies/s"
            f"  time ratio to SQLite {seconds / sqlite_s:5.2f}"
        )


if __name__ == "__main__":
    main()
