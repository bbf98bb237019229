"""Benchmark of the chest X-ray model: ``python bench/cxr.py [--repeat N] [--device D]``.

Times per image: DICOM read + preprocessing, SR + summary image building, writing (encode
once, write those bytes), the conformance gate in memory (the pipeline's path) beside the
gate reading the written files back (the baseline, ``check_files``), the whole pipeline
(``CxrModel.run`` + writing + gate), and the overhead
(everything but the forward) as a share of the service forward at batch 1 on ``--device``;
forward images/s at batch 1, 8 and 32 (on a GPU when one is present). Uses a
random-initialised checkpoint in the published file format (the real weights cannot be
fetched offline); timings do not depend on the weight values. ``--runtime`` as
``models.cxr.runtime`` (auto: ONNX Runtime on the CPU); the service's torch network at
batch 1 is timed too, for the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

# as the service runs its forward (service.models.cxr): idle OpenMP threads sleep; set
# before torch loads, so both the naive path and ours are timed with it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torchxrayvision as xrv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import CxrConfig
from service.conformance import check_datasets, check_files
from service.models.base import RunContext
from service.models.cxr import CxrModel, load_radiograph
from service.models.cxr_outputs import build_outputs
from service.pipeline import _malloc_trim
from service.uids import UidFactory
from service.values import Study
from service.writers import encode_dataset, write_encoded
from tests.test_cxr import study_of, write_checkpoint, xrv_reference_input

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cxr"
FILES = ("siim-cr-pa-jpeg.dcm", "nema-rg1-pa-j2k.dcm", "cr-mono1-chest-nometa")
ROOT = "1.2.826.0.1.3680043.8.498."


def best(fn: Callable[[], object], repeat: int) -> float:
    """The median of ``repeat`` wall-clock timings of ``fn()`` after one warm-up, in s."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onnx_threads(model: CxrModel, batch: Any, repeat: int) -> list[str]:
    """ONNX Runtime's session alone at batch 1: wall and CPU per image with 1 and 2 intra-op
    threads, their pool told to sleep (the service's setting) or to spin, on the idle
    machine and beside two busy processes (as the workers beside the forward)."""
    path = getattr(model.network, "path", None)  # an OnnxNetwork's export
    if path is None:
        return []
    import onnxruntime

    lines = [
        "ONNX Runtime session alone, batch 1 (ms per image, wall / CPU of this process), "
        "idle | beside two busy processes:"
    ]
    for threads in (1, 2):
        for spin in ("0", "1"):
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )

            def run(session: Any = session) -> None:
                session.run(None, {"input": batch})

            cells = []
            for busy in (0, 2):
                burners = [
                    subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(busy)
                ]
                try:
                    cpu0 = time.process_time()
                    wall = best(run, repeat)
                    cpu = (time.process_time() - cpu0) / (repeat + 1)
                finally:
                    for burner in burners:
                        burner.kill()
                        burner.wait()
                cells.append(f"{wall * 1e3:.1f} / {cpu * 1e3:.1f}")
            what = "spinning" if spin == "1" else "sleeping (the service's)"
            lines.append(f"  {threads} thread(s), pool {what}: " + " | ".join(cells))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    parser.add_argument("--runtime", default="auto", help="auto | onnxruntime | torch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = write_checkpoint(folder / "weights")  # with its ONNX export, as models fetch

        def load(runtime: str) -> CxrModel:
            config = CxrConfig(str(weights), "", args.device, args.threads, runtime)
            model = CxrModel(config)
            model.wait_loaded()
            if model.network is None:
                sys.exit(f"the model did not load: {model.ready().reason}")
            return model

        model = load(args.runtime)
        dev = getattr(model.network, "device", torch.device("cpu"))
        studies = {name: study_of(DATA / name) for name in FILES}
        ctx = RunContext(UidFactory(ROOT, "bench"), run_id=1)
        reference = xrv.models.DenseNet(
            weights="densenet121-res224-all", cache_dir=str(weights.parent)
        ).to(dev)
        x1 = torch.from_numpy(load_radiograph(studies[FILES[0]].instances[0]).input[None])
        x8 = x1.repeat(8, 1, 1, 1)

        def bare_forward() -> None:
            reference(x1.to(dev)).cpu()

        with torch.inference_mode():
            bare_forward()  # warm-up
            bare = best(bare_forward, args.repeat)
        fwd1 = best(lambda: model.predict(x1.numpy()), args.repeat)
        on_torch = model if model.runtime.startswith("torch") else load("torch")
        torch1 = best(lambda: on_torch.predict(x1.numpy()), args.repeat)
        fwd8 = best(lambda: model.predict(x8.numpy()), args.repeat) / 8
        x32 = x1.repeat(32, 1, 1, 1).numpy()
        fwd32 = best(lambda: model.predict(x32), args.repeat) / 32

        def write(datasets: list) -> list[tuple[Path, Any, bytes]]:  # type: ignore[type-arg]
            """As the pipeline: each object encoded once, those bytes written atomically."""
            encoded = []
            for ds in datasets:
                path, data = folder / "out" / f"{ds.SOPInstanceUID}.dcm", encode_dataset(ds)
                write_encoded(data, path)
                encoded.append((path, ds, data))
            return encoded

        def gate(encoded: list[tuple[Path, Any, bytes]], sources: set[str]) -> None:
            """The pipeline's gate: the data sets and their bytes, in memory."""
            run = {str(ds.SOPInstanceUID) for _, ds, _ in encoded}
            problems = check_datasets(encoded, source_sop_uids=sources, run_sop_uids=run)
            assert not problems, problems

        def gate_read_back(encoded: list[tuple[Path, Any, bytes]], sources: set[str]) -> None:
            """The baseline: the same gate reading the written files back."""
            run = {str(ds.SOPInstanceUID) for _, ds, _ in encoded}
            paths = [path for path, _, _ in encoded]
            problems = check_files(paths, source_sop_uids=sources, run_sop_uids=run)
            assert not problems, problems

        def whole(study: Study) -> None:
            gate(write(model.run(study, ctx).datasets), study.sop_uids)

        def naive(path: Path) -> None:
            """The researcher's script: xrv's reader and transforms, then the forward."""
            with torch.inference_mode():
                reference(torch.from_numpy(xrv_reference_input(path)[None]).to(dev)).cpu()

        threads_lines = onnx_threads(model, x1.numpy(), args.repeat)
        rows = []
        for name, study in studies.items():
            inst = study.instances[0]
            radiograph = load_radiograph(inst)
            scores = model.scores(model.predict(radiograph.input[None])[0])
            datasets = build_outputs(model, [(radiograph, scores)], ctx)
            encoded = write(datasets)
            prep = best(partial(load_radiograph, inst), args.repeat)

            def trimmed(inst: Any = inst) -> None:
                """As a worker did before: every freed page given back before each study."""
                trim = _malloc_trim()
                if trim is not None:
                    trim(0)
                load_radiograph(inst)

            prep_trimmed = best(trimmed, args.repeat)
            build = best(partial(build_outputs, model, [(radiograph, scores)], ctx), args.repeat)
            wrote = best(partial(write, datasets), args.repeat)
            gated = best(partial(gate, encoded, study.sop_uids), args.repeat)
            read_back = best(partial(gate_read_back, encoded, study.sop_uids), args.repeat)
            pipeline = best(partial(whole, study), args.repeat)
            try:
                naive_s = best(partial(naive, inst.path), args.repeat)
            except AttributeError:  # xrv's reader needs a Transfer Syntax UID in File Meta
                naive_s = float("nan")
            label = f"{name} ({inst.rows}x{inst.columns})"
            rows.append(
                (label, prep, prep_trimmed, build, wrote, gated, read_back, pipeline, naive_s)
            )

    print("cxr-densenet121 benchmark - RANDOM-INIT checkpoint in the published format")
    device = f"{dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, ", end=""
    )
    print(f"median of {args.repeat}; times in ms per image; the service runs {model.runtime}")
    print(f"  bare xrv forward, batch 1:       {bare * 1e3:8.1f}")
    print(
        f"  service's torch network, batch 1:{torch1 * 1e3:8.1f}"
        f"  (service forward / this: {fwd1 / torch1:.2f})"
    )
    for n, t in ((1, fwd1), (8, fwd8), (32, fwd32)):
        print(f"  service forward, batch {n:>2}:    {t * 1e3:8.1f}  = {1 / t:7.1f} images/s")
    header = (
        f"{'image':<38}{'read+prep':>10}{'trimmed':>8}{'SR+SC':>7}{'write':>7}{'gate':>7}"
        f"{'read-back gate':>15}{'ratio':>6}"
        f"{'pipeline':>10}{'overhead':>10}{'naive xrv':>10}{'ratio':>7}"
    )
    print(header)
    for label, prep, prep_trimmed, build, wrote, gated, read_back, pipeline, naive_s in rows:
        overhead = prep + build + wrote + gated
        print(
            f"{label:<38}{prep * 1e3:>10.1f}{prep_trimmed * 1e3:>8.1f}{build * 1e3:>7.1f}"
            f"{wrote * 1e3:>7.1f}"
            f"{gated * 1e3:>7.1f}{read_back * 1e3:>15.1f}{gated / read_back:>6.2f}"
            f"{pipeline * 1e3:>10.1f}{overhead / fwd1 * 100:>9.0f}%"
            f"{naive_s * 1e3:>10.1f}{pipeline / naive_s:>7.2f}"
        )
    for line in threads_lines:
        print(line)
    print("pipeline = CxrModel.run + writing + gate (one image); overhead = read+prep + SR+SC")
    print("+ write + gate, as a share of the service forward at batch 1 on the device (goal")
    print("<= 10 %); the bare xrv forward is the same network without the service; naive xrv =")
    print("read_xray_dcm + XRayCenterCrop + XRayResizer + forward (no outputs); ratio =")
    print("pipeline / naive xrv (the service also builds, writes and checks two objects);")
    print("gate = the conformance gate in memory (the pipeline's), read-back gate = the same")
    print("checks reading the written files back (the baseline), ratio = gate / read-back;")
    print("naive xrv nan: xrv's read_xray_dcm cannot decode a file without File Meta;")
    print("trimmed = read+prep with malloc_trim(0) before each call (as workers did after")
    print("every task; now only past pipeline.TRIM_ABOVE_MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
