"""Does the operator console hold up the pipeline? ``python bench/console.py [--studies 20]``.

Two rounds on fresh folders, each ``python main.py serve`` (annotate, one worker process,
no destination) with its console on: ``--studies`` CT studies of 2 instances are dropped at
once and timed until every one is ``written`` in the ledger. In the *quiet* round nobody
calls the console; in the *polite* round one client requests ``/``, ``/metrics`` and
``/api/studies`` with a second's pause between rounds (a dashboard and a scraper); in the
*loaded* round four client threads request them back to back. Prints the drain times,
their ratios to the quiet round (same run) and the loaded round's request latencies. The
clients run in this process, on the same cores as the service.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SHARED,
    free_port,
    ledger,
    pct,
    series_study,
    start_service,
    stop_process,
    wait_until,
)
from tests import helpers

PATHS = ("/", "/metrics", "/api/studies")


def hammer(
    base: str, stop: threading.Event, latencies: dict[str, list[float]], pause: float = 0.0
) -> None:
    while not stop.wait(pause):
        for path in PATHS:
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(base + path, timeout=30) as response:
                    response.read()
            except OSError:
                continue  # not listening yet
            latencies[path].append(time.perf_counter() - started)


def one_round(
    studies: int, clients: int, pause: float = 0.0
) -> tuple[float, dict[str, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        folder = Path(tmp)
        port = free_port()
        config = helpers.write_config(
            folder, stable=1, workers=1, http=f"127.0.0.1:{port}", max_wait=1
        )
        sources = sorted((SHARED / "series/ct-4-noise").iterdir())[:2]
        staged = [series_study("1", sources, 2, folder / "staging") for _ in range(studies)]
        (folder / "INPUT/gateway_1").mkdir(parents=True)
        proc = start_service(config, folder / "serve.log")
        base = f"http://127.0.0.1:{port}"
        latencies: dict[str, list[float]] = {path: [] for path in PATHS}
        stop = threading.Event()
        threads = [
            threading.Thread(target=hammer, args=(base, stop, latencies, pause), daemon=True)
            for _ in range(clients)
        ]
        try:
            wait_until(lambda: (folder / "STATE/heartbeat").exists(), 120, "the service")
            for thread in threads:
                thread.start()
            started = time.monotonic()
            for study in staged:
                study.drop(folder / "INPUT")

            def done() -> bool:
                rows = ledger(
                    folder / "STATE", "SELECT COUNT(*) n FROM studies WHERE state='written'"
                )
                return bool(rows) and rows[0]["n"] == studies

            wait_until(done, 900, "every study written", step=0.05)
            drained = time.monotonic() - started
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
            stop_process(proc)
        return drained, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    args = parser.parse_args()
    quiet, _ = one_round(args.studies, 0)
    polite, _ = one_round(args.studies, 1, pause=1.0)
    loaded, latencies = one_round(args.studies, 4)
    print(f"{args.studies} studies (2 CT instances each, annotate, 1 worker):")
    print(f"  drain, console idle:     {quiet:6.2f} s")
    print(f"  drain, 1 client, 1/s:    {polite:6.2f} s  ratio {polite / quiet:5.2f}")
    print(f"  drain, 4 clients nonstop:{loaded:6.2f} s  ratio {loaded / quiet:5.2f}")
    for path, values in latencies.items():
        print(
            f"  GET {path:<13} {len(values):5d} requests, median {pct(values, 0.5) * 1000:6.1f} ms,"
            f" p95 {pct(values, 0.95) * 1000:6.1f} ms"
        )


if __name__ == "__main__":
    main()
