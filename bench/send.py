"""Benchmark: our C-STORE sender against dcmtk's ``storescu``, same files, same receiver.

Usage: ``.venv/bin/python bench/send.py [--count 200] [--repeat 3] [--source FILE]
[--path fast|public]``

Makes ``--count`` copies of one DICOM file with fresh UIDs (one study), starts one dcmtk
``storescp`` on a free loopback port, then alternately sends all copies with ``storescu``
(one association) and with :func:`service.sender.send_files`. Prints a table and the ratio
of our rate to ``storescu``'s (1.0 = as fast; the goal is at least 0.8).

Both dcmtk programs run with ``TCP_NODELAY=1`` in their environment: Debian's dcmtk leaves
Nagle's algorithm on by default, which costs ~40-90 ms per C-STORE on loopback (delayed
ACKs) and would make ``storescu`` look ten times slower than it can be.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402

from bench.common import free_port, wait_listening  # noqa: E402
from devtools.sample import pydicom_file  # noqa: E402
from service import sender  # noqa: E402
from service.config import DEFAULT_UID_ROOT, PacsConfig  # noqa: E402
from service.sender import SendStatus, send_files  # noqa: E402
from service.uids import UidFactory  # noqa: E402


def make_study(source: Path, count: int, folder: Path) -> list[Path]:
    """``count`` copies of ``source`` in one new study, each with its own SOP Instance UID."""
    uids = UidFactory(DEFAULT_UID_ROOT, "bench-send", str(time.time_ns()))
    ds = dcmread(source)
    ds.StudyInstanceUID = uids.uid("study")
    ds.SeriesInstanceUID = uids.uid("series")
    paths = []
    for index in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids.uid("sop", str(index))
        ds.InstanceNumber = index + 1
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def time_storescu(port: int, paths: list[Path]) -> float:
    cmd = ["storescu", "-aet", "BENCH", "-aec", "STORESCP", "127.0.0.1", str(port)]
    started = time.perf_counter()
    subprocess.run([*cmd, *map(str, paths)], check=True, capture_output=True, env=DCMTK_ENV)
    return time.perf_counter() - started


def time_ours(port: int, paths: list[Path]) -> float:
    destination = PacsConfig(
        host="127.0.0.1", port=port, ae_title="STORESCP", calling_ae_title="BENCH"
    )
    started = time.perf_counter()
    result = send_files(destination, paths)
    elapsed = time.perf_counter() - started
    if result.status is not SendStatus.SUCCESS:
        raise RuntimeError(f"send failed: {result.status} {result.reason}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--source", type=Path, default=pydicom_file("CT_small.dcm"))
    parser.add_argument(
        "--store", action="store_true", help="storescp writes files (default: --ignore)"
    )
    parser.add_argument(
        "--max-pdu", type=int, default=16384, help="storescp's maximum receive PDU size"
    )
    parser.add_argument(
        "--path",
        choices=("auto", "fast", "public"),
        default="auto",
        help="sender data path (service.sender.FAST_PATH); auto = fast when available",
    )
    args = parser.parse_args()
    sender.FAST_PATH = {"auto": None, "fast": True, "public": False}[args.path]
    for exe in ("storescu", "storescp"):
        if not shutil.which(exe):
            sys.exit(f"{exe} not found: install dcmtk (make test-deps)")

    with tempfile.TemporaryDirectory(prefix="bench-send-") as tmp:
        folder = Path(tmp)
        (folder / "in").mkdir()
        (folder / "out").mkdir()
        paths = make_study(args.source, args.count, folder / "in")
        size = sum(p.stat().st_size for p in paths)
        port = free_port()
        store = ["-od", str(folder / "out")] if args.store else ["--ignore"]
        scp = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", "--max-pdu", str(args.max_pdu), *store, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=DCMTK_ENV,
        )
        try:
            wait_listening(port)
            times: dict[str, list[float]] = {"storescu": [], "ours": []}
            time_ours(port, paths[:2])  # warm-up: imports, first connection
            for _ in range(args.repeat):
                times["storescu"].append(time_storescu(port, paths))
                times["ours"].append(time_ours(port, paths))
        finally:
            scp.terminate()
            scp.wait(timeout=10)

    print(f"{args.count} instances of {args.source.name}, {size / 1e6:.1f} MB per send")
    print(f"{'sender':<10} {'median s':>9} {'min s':>8} {'inst/s':>8} {'MB/s':>7}")
    medians = {}
    for name, values in times.items():
        median = statistics.median(values)
        medians[name] = median
        print(
            f"{name:<10} {median:>9.3f} {min(values):>8.3f} "
            f"{args.count / median:>8.1f} {size / 1e6 / median:>7.1f}"
        )
    for name, values in times.items():
        print(f"{name} runs (s): {' '.join(f'{v:.3f}' for v in values)}")
    print(f"ratio (our rate / storescu rate): {medians['storescu'] / medians['ours']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
