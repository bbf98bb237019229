"""Benchmark of the chest X-ray model: ``python bench/cxr.py [--repeat N] [--threads N]``.

Times per image: DICOM read + preprocessing, forward at batch 1 and 8, SR + summary image
building and writing, the whole pipeline (``CxrModel.run`` + writing), and the ratio of
the whole pipeline to torchxrayvision's bare forward pass. Uses a random-initialised
checkpoint in the published file format (the real weights cannot be fetched offline);
timings do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchxrayvision as xrv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import CxrConfig
from service.models.base import RunContext
from service.models.cxr import CxrModel, load_radiograph
from service.models.cxr_outputs import build_outputs
from service.uids import UidFactory
from service.writers import write_dataset
from tests.test_cxr import study_of, write_checkpoint

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cxr"
FILES = ("siim-cr-pa-jpeg.dcm", "nema-rg1-pa-j2k.dcm", "cr-mono1-chest-nometa")
ROOT = "1.2.826.0.1.3680043.8.498."


def best(fn: Callable[[], object], repeat: int) -> float:
    """The best of ``repeat`` wall-clock timings of ``fn()``, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = write_checkpoint(folder / "weights")
        model = CxrModel(CxrConfig(weights=str(weights), device="cpu", threads=args.threads))
        studies = {name: study_of(DATA / name) for name in FILES}
        ctx = RunContext(UidFactory(ROOT, "bench"), run_id=1)
        reference = xrv.models.DenseNet(
            weights="densenet121-res224-all", cache_dir=str(weights.parent)
        )
        x1 = torch.from_numpy(load_radiograph(studies[FILES[0]].instances[0]).input[None])
        x8 = x1.repeat(8, 1, 1, 1)
        with torch.inference_mode():
            reference(x1)  # warm-up
            bare = best(lambda: reference(x1), args.repeat)
        fwd1 = best(lambda: model.predict(x1.numpy()), args.repeat)
        fwd8 = best(lambda: model.predict(x8.numpy()), args.repeat) / 8

        def write(datasets: list) -> None:  # type: ignore[type-arg]
            for ds in datasets:
                write_dataset(ds, folder / "out" / f"{ds.SOPInstanceUID}.dcm")

        rows = []
        for name, study in studies.items():
            inst = study.instances[0]
            radiograph = load_radiograph(inst)
            scores = model.scores(model.predict(radiograph.input[None])[0])
            prep = best(lambda inst=inst: load_radiograph(inst), args.repeat)
            out = best(
                lambda r=radiograph, s=scores: write(build_outputs(model, [(r, s)], ctx)),
                args.repeat,
            )
            whole = best(lambda study=study: write(model.run(study, ctx).datasets), args.repeat)
            rows.append((f"{name} ({inst.rows}x{inst.columns})", prep, out, whole))

    print("cxr-densenet121 benchmark - RANDOM-INIT checkpoint in the published format")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu, ", end="")
    print(f"best of {args.repeat}; times in ms per image")
    print(f"  bare xrv forward, batch 1:     {bare * 1e3:8.1f}")
    print(f"  service forward, batch 1:      {fwd1 * 1e3:8.1f}")
    print(f"  service forward, batch 8:      {fwd8 * 1e3:8.1f}  (per image)")
    header = f"{'image':<44}{'read+prep':>10}{'SR+SC+write':>13}{'pipeline':>10}{'ratio':>7}"
    print(header)
    for label, prep, out, whole in rows:
        ratio = whole / bare
        print(f"{label:<44}{prep * 1e3:>10.1f}{out * 1e3:>13.1f}{whole * 1e3:>10.1f}{ratio:>7.1f}")
    print("ratio = whole pipeline (CxrModel.run + writing) / bare xrv forward at batch 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
