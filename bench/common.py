"""Shared helpers of the end-to-end benchmarks: workloads, receiver, service process, ledger."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.sample import open_image_db, record  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
#: dcmtk leaves Nagle's algorithm on unless told (see bench/send.py).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def start_storescp(port: int) -> subprocess.Popen[bytes]:
    """dcmtk's ``storescp --ignore`` (receives and discards) on ``port``."""
    if not shutil.which("storescp"):
        sys.exit("storescp not found: install dcmtk (make test-deps)")
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "--ignore", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    wait_listening(port)
    return proc


def storescu_seconds(port: int, paths: Sequence[Path]) -> float:
    """Wall time of one ``storescu`` association sending ``paths``."""
    cmd = ["storescu", "-R", "-aet", "BENCH", "-aec", "STORESCP", "127.0.0.1", str(port)]
    started = time.perf_counter()  # -R: propose only the SOP classes of the files given
    done = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, env=DCMTK_ENV)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"storescu failed: {done.stdout[-500:]} {done.stderr[-1000:]}")
    return elapsed


def reidentify(source: Path, study_uid: str, series_uid: str, number: int = 1) -> Dataset:
    """``source`` with the given study/series UIDs and a fresh SOP Instance UID."""
    ds = dcmread(source, force=True)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.InstanceNumber = number
    if "PatientID" not in ds:
        ds.PatientID = "BENCH"
    return ds


class StagedStudy:
    """A study prepared outside INPUT, dropped later like a gateway app does."""

    def __init__(self, gateway_id: str, label: str, datasets: list[Dataset], staging: Path):
        self.gateway_id = gateway_id
        self.label = label
        self.study_uid = str(datasets[0].StudyInstanceUID)
        self.datasets = datasets
        self.files: list[Path] = []
        folder = staging / self.study_uid
        folder.mkdir(parents=True)
        for ds in datasets:
            path = folder / str(ds.SOPInstanceUID)
            ds.save_as(path, enforce_file_format=True)
            self.files.append(path)
        self.files_at = 0.0  # wall time once every file is in place
        self.dropped_at = 0.0  # ... and every image.db row

    def drop(self, input_dir: Path) -> None:
        """Copy the files into the study folder, then add the image.db rows."""
        gateway = input_dir / f"gateway_{self.gateway_id}"
        target = gateway / self.study_uid
        target.mkdir(parents=True, exist_ok=True)
        copied = []
        for path in self.files:
            shutil.copyfile(path, target / path.name)
            copied.append(target / path.name)
        self.files_at = time.time()  # the quiet period starts with the last file written
        db = open_image_db(gateway / "image.db")
        try:
            with db:
                for ds, path in zip(self.datasets, copied, strict=True):
                    record(db, ds, path)
        finally:
            db.close()
        self.dropped_at = time.time()


def cxr_study(gateway_id: str, source: Path, staging: Path) -> StagedStudy:
    ds = reidentify(source, generate_uid(), generate_uid())
    return StagedStudy(gateway_id, source.name, [ds], staging)


def series_study(
    gateway_id: str, sources: Sequence[Path], count: int, staging: Path
) -> StagedStudy:
    """``count`` instances in one series, cycling through ``sources``."""
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = [
        reidentify(sources[i % len(sources)], study_uid, series_uid, i + 1) for i in range(count)
    ]
    return StagedStudy(gateway_id, f"{sources[0].parent.name} x{count}", datasets, staging)


def ledger(state_dir: Path, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return list(db.execute(sql, params))
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_service(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python main.py --config CONFIG serve`` with its log in ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--config", str(config), "serve"],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summary(values: Sequence[float]) -> str:
    """``p50 p95 max`` in seconds, fixed width."""
    if not values:
        return f"{'-':>7}{'-':>7}{'-':>7}"
    return f"{pct(values, 0.5):7.2f}{pct(values, 0.95):7.2f}{max(values):7.2f}"
