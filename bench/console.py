"""Does the operator console hold up the pipeline? ``python bench/console.py [--studies 20]``.

Two rounds on fresh folders, each ``python main.py serve`` (annotate, one worker process,
no destination) with its console on: ``--studies`` CT studies of 2 instances are dropped at
once and timed until every one is ``written`` in the ledger. In the *quiet* round nobody
calls the console; in the *polite* round one client requests ``/``, ``/metrics`` and
``/api/studies`` with a second's pause between rounds (a dashboard and a scraper); in the
*loaded* round four client threads request them back to back. Prints the drain times,
their ratios to the quiet round (same run) and the loaded round's request latencies. The
clients run in this process, on the same cores as the service.

``python bench/console.py --history 5000`` instead times one ``/metrics`` scrape against a
ledger with that many runs (recorded through the ledger's ordinary transitions in a
temporary STATE, most of them sent): the full read every scrape did before issue 18's
change (every run's timings, :meth:`Ledger.run_timings`), against the console's scrape now
(:class:`service.console.LedgerCollector` after its first scrape, ``--new`` runs recorded
between two scrapes); the same ledger, the same run, medians of ``--repeat``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

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
from service.config import Config, from_mapping
from service.console import (
    FORWARD_BUCKETS,
    SENT_BUCKETS,
    LedgerCollector,
    RunMetrics,
    count_families,
)
from service.ledger import Ledger
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


class FullRead(Collector):
    """``/metrics``' ledger part as every scrape computed it before issue 18's change: the
    counts and every run's timings read, the histograms built from all of them."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def collect(self) -> Iterator[Metric]:
        ledger = Ledger.open_readonly(self.config.ledger_location)
        assert ledger is not None
        try:
            counts, timings = ledger.state_counts(), ledger.run_timings()
        finally:
            ledger.close()
        yield from count_families(counts)
        sent: dict[tuple[str, ...], list[float]] = {}
        forward: dict[tuple[str, ...], list[float]] = {}
        for run in timings:
            t = run["timings"]
            stable_at = t.get("stable_at")
            if run["sent_at"] is not None and isinstance(stable_at, int | float):
                sent.setdefault((run["gateway_id"],), []).append(run["sent_at"] - stable_at)
            value = t.get("forward_s", t.get("model_s"))
            if isinstance(value, int | float):
                forward.setdefault((run["gateway_id"], run["model_name"]), []).append(value)
        for name, labels, samples, buckets in (
            ("gateway_quiet_to_sent_seconds", ["gateway"], sent, SENT_BUCKETS),
            ("gateway_model_forward_seconds", ["gateway", "model"], forward, FORWARD_BUCKETS),
        ):
            family = HistogramMetricFamily(name, name, labels=labels)
            for key, values in sorted(samples.items()):
                pairs = [(str(b), float(sum(1 for v in values if v <= b))) for b in buckets]
                family.add_metric(list(key), [*pairs, ("+Inf", float(len(values)))], sum(values))
            yield family


def record_runs(ledger: Ledger, first: int, count: int) -> None:
    """``count`` runs through the ordinary transitions: 5 in 7 sent, the rest failed, skipped
    or with a send refused; two gateways, two models."""
    outcomes = ("success", "success", "success", "success", "warning", "failed", "refused")
    for n in range(first, first + count):
        helpers.ledger_run(
            ledger,
            f"1.2.826.0.1.{n}",
            gateway_id=str(1 + n % 2),
            model="annotate" if n % 3 else "cxr-densenet121",
            timings={"stable_at": time.time() - 30.0, "forward_s": 0.05 + (n % 50) * 0.01},
            outcome=outcomes[n % len(outcomes)],
        )


def scrape_bench(history: int, new: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        config = from_mapping({"service": {"state_dir": str(Path(tmp) / "STATE"), "http": ""}})
        ledger = Ledger(config.ledger_location)
        started = time.monotonic()
        record_runs(ledger, 0, history)
        recorded = time.monotonic() - started
        registry = CollectorRegistry(auto_describe=False)
        registry.register(LedgerCollector(config, None, None))
        t0 = time.perf_counter()
        generate_latest(registry)  # the first scrape of a (re)started console: all of it
        first = time.perf_counter() - t0
        old = CollectorRegistry(auto_describe=False)
        old.register(FullRead(config))
        before: list[float] = []
        after: list[float] = []
        counts: list[float] = []
        histograms: list[float] = []
        runs = RunMetrics()  # the collector's part that reads runs and sends, on its own
        reader = Ledger.open_readonly(config.ledger_location)
        assert reader is not None
        runs.update(reader)
        reader.close()
        for i in range(repeat):
            record_runs(ledger, history + i * new, new)
            t0 = time.perf_counter()
            generate_latest(registry)
            after.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            generate_latest(old)
            before.append(time.perf_counter() - t0)
            reader = Ledger.open_readonly(config.ledger_location)
            assert reader is not None
            t0 = time.perf_counter()
            reader.state_counts()
            counts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runs.update(reader)
            histograms.append(time.perf_counter() - t0)
            reader.close()
        ledger.close()
    b, a = pct(before, 0.5), pct(after, 0.5)
    print(f"/metrics scrape, SQLite ledger of {history} runs ({recorded:.0f} s to record),")
    print(f"  {new} new runs between scrapes, medians of {repeat}; load {os.getloadavg()}:")
    print(f"  full read (before):        {b * 1000:8.2f} ms")
    print(f"  since the last (after):    {a * 1000:8.2f} ms  ratio {b / a:5.1f}")
    print(f"  of which GROUP BY counts:  {pct(counts, 0.5) * 1000:8.2f} ms")
    print(f"  and the histograms' read: {pct(histograms, 0.5) * 1000:8.2f} ms")
    print(f"  first scrape after start:  {first * 1000:8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--history", type=int, default=0, help="time /metrics instead")
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    if args.history:
        scrape_bench(args.history, args.new, args.repeat)
        return
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
