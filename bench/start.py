"""What a user meets first: ``python bench/start.py [--runs N] [--old REF]``.

Each run starts ``python main.py serve`` in a fresh process on fresh folders (INPUT,
OUTPUT, STATE), ``service.workers = --workers``, with one chest radiograph study already
waiting in INPUT, and sends to dcmtk ``storescp --ignore``. It measures, from the moment
``serve`` is started:

* *healthy*: ``status --health``'s verdict (:func:`service.supervision.health`) first true;
* *first study sent*: the waiting study processed and sent (the service is healthy and
  processing);
* the resident memory (RSS, and PSS: shared pages counted once) of the service and of each
  of its child processes once the first study is sent and after the workloads below, with
  each process's peak (VmHWM);
* *8 s after start*: ``--studies`` CXR studies dropped at once 8 s after ``serve`` began,
  and the same again once those are sent (*warm*): the time per study from the end of
  their quiet period to the last one sent, divided by their number.

Baselines measured in the same run, each in a fresh process just before each service run
(the machine may be shared: each run is compared with what was measured under the same
load): ``python -c "import torch"``; the naive torchxrayvision script a researcher writes
(import torchxrayvision, load the DenseNet, ``read_xray_dcm`` + ``XRayCenterCrop`` +
``XRayResizer`` + forward on one image), from its start to its first scores; that script's
time per image once warm: the median of 7 of each of the three radiographs the studies
cycle through (JPEG 1024², raw 440², JPEG 2000 1955×1841), then their mean, so that it is
the same mix of images as the service's studies (the JPEG alone, as before, left out the
JPEG 2000 decode, about 10× the others' read). With ``--old REF``, the service of git revision REF
(``git archive``, run with the same virtual environment) on the same workload, last.

The first run is "cold" only in that it is the first process of the bench to start the
service (the page cache is not dropped: that needs root on a shared machine); the others
are warm. The CXR model uses a RANDOM-INIT checkpoint in the published format, with its ONNX
export beside it as `models fetch` leaves it (`--no-export`: none, each start makes one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.uid import generate_uid

from bench.common import (
    ROOT,
    SHARED,
    StagedStudy,
    cpu_seconds,
    cxr_study,
    free_port,
    ledger,
    reidentify,
    start_storescp,
    stop_process,
    wait_until,
)
from service.supervision import health
from tests import helpers

CXR_FILES = ("siim-cr-pa-jpeg.dcm", "cr-mono1-chest-nometa", "nema-rg1-pa-j2k.dcm")
DROP_AFTER_S = 8.0
FINAL = ("sent", "send_failed", "failed", "skipped")

CHECKPOINT = """
import sys
from pathlib import Path
from tests.test_cxr import write_checkpoint
print(write_checkpoint(Path(sys.argv[1]), export=sys.argv[2] == "export"))
"""

NAIVE = """
import statistics, sys, time
t0 = time.perf_counter()
import numpy as np, torch, torchxrayvision as xrv
torch.set_num_threads(int(sys.argv[2]))
model = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=sys.argv[1])

def one(path):
    image = xrv.utils.read_xray_dcm(path)
    image = xrv.datasets.XRayCenterCrop()(image[None, ...])
    image = xrv.datasets.XRayResizer(224)(image)
    with torch.inference_mode():
        return model(torch.from_numpy(np.asarray(image, dtype=np.float32))[None])

paths = sys.argv[3:]
one(paths[0])
first = time.perf_counter() - t0
times, cpu = [], []  # per image: the median of 7 of each, then their mean over the images
for path in paths:
    one(path)  # its first read warms that codec
    wall, proc = [], []
    for _ in range(7):
        t1, c1 = time.perf_counter(), time.process_time()
        one(path)
        wall.append(time.perf_counter() - t1)
        proc.append(time.process_time() - c1)
    times.append(statistics.median(wall))
    cpu.append(statistics.median(proc))
print(first, statistics.mean(times), statistics.mean(cpu), *times)
"""


# -- processes and their memory ------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _kb(value: str) -> float:
    return int(value.split()[0]) / 1024 if value else 0.0


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return _kb(line.split(":", 1)[1])
    except OSError:
        pass
    return float("nan")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


@dataclass
class Footprint:
    """Memory of one process: resident now, proportional share now, peak resident (MiB)."""

    role: str
    rss: float
    pss: float
    peak: float


def footprint(service_pid: int) -> list[Footprint]:
    """The service process and every descendant (workers, multiprocessing's helpers)."""
    found: list[Footprint] = []
    pending = [(service_pid, "service")]
    while pending:
        pid, role = pending.pop(0)
        try:
            status = _status(pid)
            found.append(Footprint(role, _kb(status["VmRSS"]), _pss_mb(pid), _kb(status["VmHWM"])))
            children = _children(pid)
        except (OSError, KeyError):
            continue
        for child in children:
            try:
                line = b" ".join(Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"))
            except OSError:
                continue
            kind = "tracker" if b"resource_tracker" in line else "worker"
            pending.append((child, kind))
    return found


def tree_cpu(service_pid: int) -> float:
    """CPU seconds (user + system) of the service and its live descendants so far."""
    seconds = 0.0
    pending = [service_pid]
    while pending:
        pid = pending.pop()
        try:
            seconds += cpu_seconds(pid)
            pending += _children(pid)
        except (OSError, IndexError, ValueError):
            continue
    return seconds


def total(prints: list[Footprint], attr: str) -> float:
    return sum(float(getattr(p, attr)) for p in prints)


# -- one service run -----------------------------------------------------------------------


@dataclass
class StartRun:
    label: str
    healthy_s: float = float("nan")
    first_sent_s: float = float("nan")
    first_timings: dict[str, float] = field(default_factory=dict)  # its run's, from t0
    after_drop_per_study: float = float("nan")
    warm_per_study: float = float("nan")
    cpu_per_study: list[float] = field(default_factory=list)  # per drop
    stages: list[str] = field(default_factory=list)  # per drop: where its time went
    at_first: list[Footprint] = field(default_factory=list)
    at_end: list[Footprint] = field(default_factory=list)
    code: int = 0
    not_sent: int = 0
    log: str = ""


def study_state(state_dir: Path, study: StagedStudy) -> str:
    rows = ledger(
        state_dir,
        "SELECT state FROM studies WHERE gateway_id=? AND study_uid=?",
        (study.gateway_id, study.study_uid),
    )
    return str(rows[0]["state"]) if rows else ""


def sent_at(state_dir: Path, study: StagedStudy) -> float:
    rows = ledger(
        state_dir,
        "SELECT s.finished FROM sends s JOIN runs r ON s.run_id = r.run_id "
        "WHERE r.gateway_id=? AND r.study_uid=? ORDER BY s.send_id DESC LIMIT 1",
        (study.gateway_id, study.study_uid),
    )
    return float(rows[0]["finished"]) if rows and rows[0]["finished"] else float("nan")


def first_run_timings(state_dir: Path, study: StagedStudy, t0: float) -> dict[str, float]:
    """The study's run timings: moments as seconds since ``t0``, durations as they are."""
    rows = ledger(
        state_dir,
        "SELECT timings FROM runs WHERE gateway_id=? AND study_uid=? ORDER BY run_id LIMIT 1",
        (study.gateway_id, study.study_uid),
    )
    timings: dict[str, float] = json.loads(rows[0]["timings"]) if rows else {}
    return {k: v - t0 if k.endswith("_at") else v for k, v in timings.items()}


def poll_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wall time at which ``predicate`` first held (polled every 20 ms)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return time.time()
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def per_study(state: Path, studies: list[StagedStudy], stable: float) -> float:
    """Seconds per study from the end of the quiet period (the last drop + stable_seconds)
    to the last one sent, over all of them."""
    quiet_end = max(s.files_at for s in studies) + stable
    return (max(sent_at(state, s) for s in studies) - quiet_end) / len(studies)


def stages(state: Path, studies: list[StagedStudy], stable: float) -> str:
    """Where a drop's time went: its span (quiet period's end to the last sent), the sum of
    its forwards (each batch once) and the median of each worker stage per study, in ms."""
    timings = [t for s in studies if (t := first_run_timings(state, s, 0.0))]
    if not timings:
        return "no runs"
    span = max(sent_at(state, s) for s in studies) - max(s.files_at for s in studies) - stable
    forwards = sum(t.get("forward_s", 0.0) / max(t.get("batch", 1.0), 1.0) for t in timings)
    medians = ", ".join(
        f"{key.removesuffix('_s')} {statistics.median(t.get(key, 0.0) for t in timings) * 1e3:.0f}"
        for key in ("prepare_s", "build_s", "write_s", "gate_s")
    )
    return f"{span:.2f} s, forwards {forwards:.2f} s; medians (ms) {medians}"


def run_service(
    label: str,
    main_py: Path,
    folder: Path,
    weights: Path,
    port: int,
    args: argparse.Namespace,
) -> StartRun:
    sources = [SHARED / "cxr" / name for name in CXR_FILES]
    staging = folder / "staging"
    first = cxr_study("1", sources[0], staging)
    batches = [
        [cxr_study("1", sources[i % len(sources)], staging) for i in range(args.studies)]
        for _ in range(2)
    ]
    config = helpers.write_config(
        folder,
        f'[pacs]\nhost = "127.0.0.1"\nport = {port}\nae_title = "STORESCP"\n'
        f'[models.cxr]\nweights = "{weights}"\ndevice = "cpu"\nthreads = {args.threads}\n',
        args.stable,
        args.workers,
        rules='[{ model = "cxr-densenet121", modality = ["CR", "DX"] }]',
        max_wait=60,
        watch="native",
        log_level="INFO",
        rescan_seconds=30,
    )
    first.drop(folder / "INPUT")  # waiting before the service starts
    state = folder / "STATE"
    log = folder / "service.log"
    run = StartRun(label)
    with open(log, "wb") as fh:
        t0 = time.time()
        service = subprocess.Popen(
            [sys.executable, str(main_py), "--config", str(config), "serve"],
            cwd=main_py.parent,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:

        def healthy() -> bool:
            if service.poll() is not None:
                raise RuntimeError(f"{label}: serve exited {service.returncode}: {log.read_text()}")
            return health(state).ok

        run.healthy_s = poll_until(healthy, 300, "healthy") - t0
        poll_until(lambda: study_state(state, first) in FINAL, 300, "the first study")
        run.first_sent_s = sent_at(state, first) - t0
        run.first_timings = first_run_timings(state, first, t0)
        run.at_first = footprint(service.pid)
        time.sleep(max(0.0, t0 + DROP_AFTER_S - time.time()))
        for batch in batches:
            cpu0 = tree_cpu(service.pid)
            for study in batch:
                study.drop(folder / "INPUT")
            wait_until(
                lambda b=batch: all(study_state(state, s) in FINAL for s in b),  # type: ignore[misc]
                900,
                "the studies",
            )
            run.cpu_per_study.append((tree_cpu(service.pid) - cpu0) / len(batch))
        run.stages = [stages(state, batch, args.stable) for batch in batches]
        run.after_drop_per_study = per_study(state, batches[0], args.stable)
        run.warm_per_study = per_study(state, batches[1], args.stable)
        run.at_end = footprint(service.pid)
        run.not_sent = sum(study_state(state, s) != "sent" for s in [first, *batches[0]])
        run.not_sent += sum(study_state(state, s) != "sent" for s in batches[1])
    finally:
        run.code = stop_process(service)
        run.log = log.read_text(errors="replace")
    return run


def old_tree(ref: str, folder: Path) -> Path:
    """The service of git revision ``ref``, exported into ``folder``; its main.py."""
    archive = folder / "old.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), ref],
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "old", filter="data")
    return folder / "old" / "main.py"


def python_seconds(code: str, *argv: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return time.perf_counter() - t0, done.stdout


@dataclass(frozen=True)
class Baseline:
    torch_s: float  # python -c "import torch", wall
    first_s: float  # the naive script, from its start to its first scores, wall
    image_s: float  # ... then per image, warm (median of 7), wall
    cpu_s: float  # ... and its CPU time per image
    per_file_s: tuple[float, ...] = ()  # the time per image of each of CXR_FILES, wall


def naive_inputs(folder: Path) -> list[Path]:
    """CXR_FILES as the service's studies get them (:func:`bench.common.cxr_study`: saved
    again with a file meta header; read_xray_dcm cannot decode the raw file without one)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in CXR_FILES:
        ds = reidentify(SHARED / "cxr" / name, generate_uid(), generate_uid())
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def baseline(weights: Path, threads: int, inputs: list[Path]) -> Baseline:
    torch_s, _ = python_seconds("import torch")
    paths = [str(path) for path in inputs]
    first_s, out = python_seconds(NAIVE, str(weights.parent), str(threads), *paths)
    values = [float(v) for v in out.split()[-(3 + len(paths)) :]]
    _, image_s, cpu_s = values[:3]
    return Baseline(torch_s, first_s, image_s, cpu_s, tuple(values[3:]))


def memory_cells(prints: list[Footprint]) -> str:
    parts = ", ".join(f"{p.role} {p.rss:.0f}" for p in prints)
    return f"{total(prints, 'rss'):.0f} MiB RSS ({parts}); PSS {total(prints, 'pss'):.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="service starts (first = cold)")
    parser.add_argument("--workers", type=int, default=2, help="service.workers")
    parser.add_argument("--studies", type=int, default=12, help="CXR studies per drop")
    parser.add_argument("--stable", type=float, default=1.0, help="stable_seconds")
    parser.add_argument("--threads", type=int, default=2, help="models.cxr.threads")
    parser.add_argument("--old", default="", help="also run the service of this git revision")
    parser.add_argument("--log", action="store_true", help="print the first run's service log")
    parser.add_argument(
        "--no-export",
        action="store_true",
        help="no ONNX export beside the weights (as before models fetch made one): each run's "
        "service makes it in its fresh STATE",
    )
    args = parser.parse_args()
    for name in CXR_FILES:
        if not (SHARED / "cxr" / name).exists():
            sys.exit(f"{SHARED / 'cxr' / name} is missing: this benchmark needs ../shared/data")
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        folder = Path(tmp)
        export = "none" if args.no_export else "export"
        _, out = python_seconds(CHECKPOINT, str(folder / "weights"), export)
        weights = Path(out.strip().splitlines()[-1])
        inputs = naive_inputs(folder / "naive")
        port = free_port()
        scp = start_storescp(port)
        plan = [("cold" if i == 0 else f"warm {i}", ROOT / "main.py") for i in range(args.runs)]
        if args.old:
            plan.append((f"old {args.old}", old_tree(args.old, folder)))
        runs: list[tuple[StartRun, Baseline]] = []
        try:
            for i, (label, main_py) in enumerate(plan):
                base = baseline(weights, args.threads, inputs)  # just before: the same load
                run = run_service(label, main_py, folder / f"run-{i}", weights, port, args)
                runs.append((run, base))
        finally:
            stop_process(scp)

    print("Start-up benchmark: python main.py serve, fresh process and fresh STATE each run")
    print(
        f"service.workers = {args.workers}, stable_seconds = {args.stable:g}, "
        f"models.cxr.threads = {args.threads}; RANDOM-INIT checkpoint in the published format"
    )
    print(
        "no ONNX export beside the weights: each service start makes one"
        if args.no_export
        else "the checkpoint's ONNX export lies beside it, as models fetch leaves it"
    )
    print()
    print("baselines, each measured just before the run on its line:")
    print(
        f"{'run':<12}{'import torch':>13}{'naive 1st':>10}{'naive/img':>10}{'CPU/img':>9}"
        f"   (naive = torchxrayvision's read_xray_dcm + XRayCenterCrop + XRayResizer +"
        " forward)"
    )
    for run, base in runs:
        files = ", ".join(
            f"{name} {t * 1e3:.0f}" for name, t in zip(CXR_FILES, base.per_file_s, strict=True)
        )
        print(
            f"{run.label:<12}{base.torch_s:>12.2f}s{base.first_s:>9.2f}s"
            f"{base.image_s * 1e3:>8.0f}ms{base.cpu_s * 1e3:>7.0f}ms   ({files} ms)"
        )
    print()
    print(
        f"{'run':<12}{'healthy':>9}{'1st sent':>10}{'vs naive':>9}"
        f"{'8 s drop':>10}{'ratio':>7}{'warm':>8}{'ratio':>7}  memory after the drops"
    )
    for run, base in runs:
        print(
            f"{run.label:<12}{run.healthy_s:>8.2f}s{run.first_sent_s:>9.2f}s"
            f"{run.first_sent_s / base.first_s:>9.2f}"
            f"{run.after_drop_per_study:>9.3f}s{run.after_drop_per_study / base.image_s:>7.2f}"
            f"{run.warm_per_study:>7.3f}s{run.warm_per_study / base.image_s:>7.2f}"
            f"  {memory_cells(run.at_end)}"
        )
    print()
    print("healthy / 1st sent: s from starting serve (one CXR study waiting in INPUT); vs naive =")
    print("1st sent / the naive script's start to its first scores; 8 s drop / warm: s per study")
    print(
        f"from the quiet period's end to the last of {args.studies} sent, dropped 8 s after start"
    )
    print("/ once those were sent; ratio = that / the naive script's time per image (warm,")
    print("mean over the three radiographs the studies cycle through).")
    print("CPU per study (service and workers, all threads; OpenMP spin-waiting inflates it on")
    print("contended cores, for both) against the naive script's CPU per image:")
    for run, base in runs:
        cells = ", ".join(
            f"{name} {c * 1e3:.0f} ms = {c / base.cpu_s:.2f}x"
            for name, c in zip(("8 s drop", "warm"), run.cpu_per_study, strict=False)
        )
        print(f"  {run.label:<12} {cells}")
    print("Memory in MiB per process; peak resident (VmHWM) per process:")
    for run, _ in runs:
        peaks = ", ".join(f"{p.role} {p.peak:.0f}" for p in run.at_end)
        print(f"  {run.label:<12} at first study: {memory_cells(run.at_first)}; peaks: {peaks}")
    print("where each drop's time went (quiet period's end to the last sent; the sum of its")
    print("forwards, each batch once; the medians of the workers' stages per study):")
    for run, _ in runs:
        print(f"  {run.label:<12} " + " | ".join(run.stages))
    print("the first study's run (moments in s from starting serve, durations in s):")
    for run, _ in runs:
        cells = ", ".join(f"{k} {v:.2f}" for k, v in sorted(run.first_timings.items()))
        print(f"  {run.label:<12} {cells}")
    if args.log:
        print(runs[0][0].log)
    bad = [run for run, _ in runs if run.code or run.not_sent]
    for run in bad:
        print(f"{run.label}: exit {run.code}, {run.not_sent} studies not sent")
        print(run.log[-3000:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
