"""Benchmark: STOW-RS against C-STORE to the same Orthanc, same files.

Usage: ``.venv/bin/python bench/stow.py [--count 100] [--repeat 3] [--source FILE]``

Starts one Orthanc (Debian's package) with its DICOMweb plugin and HTTP authentication on,
then alternately sends a fresh study of ``--count`` copies of one file (new UIDs each time,
so Orthanc stores every instance anew) over one C-STORE association
(:func:`service.sender.send_files`) and one STOW-RS request
(:func:`service.stow.send_files_stow`). Prints a table and the ratio of the STOW-RS rate to
the C-STORE rate measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.send import make_study  # noqa: E402
from devtools.sample import pydicom_file  # noqa: E402
from service.config import PacsConfig  # noqa: E402
from service.sender import SendResult, SendStatus, send_files  # noqa: E402
from service.stow import send_files_stow  # noqa: E402
from tests.orthanc import start_orthanc, stop_orthanc  # noqa: E402

USER, PASSWORD = "bench", "bench-password"


Send = Callable[[PacsConfig, list[Path]], SendResult]


def timed(send: Send, destination: PacsConfig, paths: list[Path]) -> float:
    started = time.perf_counter()
    result = send(destination, paths)
    elapsed = time.perf_counter() - started
    if result.status is not SendStatus.SUCCESS:
        raise RuntimeError(f"send failed: {result.status} {result.reason}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--source", type=Path, default=pydicom_file("CT_small.dcm"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        folder = Path(tmp)
        (folder / "orthanc").mkdir()
        server = start_orthanc(folder / "orthanc", users={USER: PASSWORD})
        try:
            dimse = PacsConfig(host="127.0.0.1", port=server.dicom_port, ae_title=server.ae_title)
            web = PacsConfig(url=server.dicomweb_url, username=USER, password=PASSWORD)
            times: dict[str, list[float]] = {"C-STORE": [], "STOW-RS": []}
            size = 0
            for index in range(args.repeat + 1):  # the first round warms both up
                for name, send, destination in (
                    ("C-STORE", send_files, dimse),
                    ("STOW-RS", send_files_stow, web),
                ):
                    study = folder / f"{name}-{index}"
                    study.mkdir()
                    paths = make_study(args.source, args.count, study)
                    size = sum(p.stat().st_size for p in paths)
                    elapsed = timed(send, destination, paths)
                    if index:
                        times[name].append(elapsed)
        finally:
            stop_orthanc(server)
    print(f"{args.count} instances of {args.source.name}, {size / 1e6:.1f} MB per send, Orthanc")
    print(f"{'protocol':<9} {'median s':>9} {'min s':>8} {'inst/s':>8}")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        rate = args.count / medians[name]
        print(f"{name:<9} {medians[name]:>9.3f} {min(values):>8.3f} {rate:>8.1f}")
    print(f"ratio (STOW-RS rate / C-STORE rate): {medians['C-STORE'] / medians['STOW-RS']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
