"""The CXR network on ONNX Runtime: exported once from torch, checked, then run without torch.

On the CPU, ONNX Runtime runs the DenseNet-121 forward in 0.30x the time of the torch
network as the service runs it, and the service process then never imports torch: 240 MiB
instead of 687 at the first study, which is sent about 0.9 s sooner
(``bench/cxr.py``, ``bench/start.py``). The graph is exported from the network of
:mod:`service.models.cxr_net` (the weights file, sigmoid and ``op_norm`` included), so the
scores are torchxrayvision's ``model(x)``.

An export is used only with its record (``<name>.json`` beside ``<name>.onnx``), which the
export writes last: the weights' sha256, the ONNX file's sha256, the ONNX Runtime version
that checked it, and the largest difference between its scores and torch's on the check
inputs, which must stay within :data:`TOLERANCE`. Any mismatch (other weights, a changed
file, another ONNX Runtime) makes the export be made and checked again.

This module imports torch only in :func:`export`, which the service runs in a child process
(:func:`export_in_child`), so that the service process itself never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np

from service.errors import ModelError
from service.models.cxr import LABELS, OP_THRESHS, sha256_file

logger = logging.getLogger(__name__)

#: Largest difference allowed between a score of the export and torch's (the bound within
#: which the scores count as torchxrayvision's); the measured one is kept in the record.
TOLERANCE = 1e-3
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "scores"
#: How long a child process may take to export and check (import torch, load, export).
EXPORT_TIMEOUT_SECONDS = 600.0
ROOT = Path(__file__).resolve().parents[2]


def runtime_version() -> str:
    """The installed ONNX Runtime's version; "" when it is not installed."""
    try:
        return package_version("onnxruntime")
    except PackageNotFoundError:
        return ""


@dataclass(frozen=True)
class ExportRecord:
    """What an export was made from and how it was checked (the ``.json`` beside it)."""

    weights_sha256: str
    onnx_sha256: str
    onnxruntime: str
    torch: str
    opset: int
    max_abs_diff: float  # largest |ONNX Runtime score - torch score| on the check inputs
    tolerance: float


def export_path(folder: Path, weights_sha256: str) -> Path:
    """Where the export of the weights with this digest lives in ``folder``."""
    return folder / f"densenet121-res224-all-{weights_sha256[:16]}.onnx"


def _record_path(onnx: Path) -> Path:
    return onnx.with_suffix(".json")


def valid_export(folder: Path, weights_sha256: str) -> tuple[Path, ExportRecord] | None:
    """The export in ``folder`` for these weights, when its record says it was checked for
    them, by this ONNX Runtime, within :data:`TOLERANCE`, and the file is unchanged."""
    onnx = export_path(folder, weights_sha256)
    try:
        record = ExportRecord(**json.loads(_record_path(onnx).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if (
        record.weights_sha256 != weights_sha256
        or record.onnxruntime != runtime_version()
        or not record.max_abs_diff <= record.tolerance <= TOLERANCE
    ):
        return None
    try:
        if sha256_file(onnx) != record.onnx_sha256:
            logger.warning("%s differs from its record; it is exported again", onnx)
            return None
    except OSError:
        return None
    return onnx, record


def check_inputs() -> np.ndarray:
    """Inputs the export is checked on, in torchxrayvision's range [-1024, 1024]: noise, a
    smooth chest-like field, its negative, a flat image and the range's ends."""
    rng = np.random.default_rng(1500)
    y, x = np.mgrid[-1:1:224j, -1:1:224j]
    smooth = 1024 * np.cos(2.2 * x) * np.cos(1.6 * y) - 300 * (x**2)
    images = [
        rng.uniform(-1024, 1024, (224, 224)),
        smooth,
        -smooth,
        np.zeros((224, 224)),
        np.full((224, 224), 1024.0),
        np.full((224, 224), -1024.0),
        np.clip(smooth + rng.normal(0, 80, (224, 224)), -1024, 1024),
    ]
    return np.stack(images)[:, None].astype(np.float32)


def export(weights: Path, folder: Path) -> tuple[Path, ExportRecord]:
    """Export the network of ``weights`` to ``folder``, check it against torch, and write
    the export and then its record atomically. Raises :class:`ModelError` when the scores
    differ by more than :data:`TOLERANCE` (nothing is kept then)."""
    import onnxruntime
    import torch

    from service.models.cxr_net import load_network

    weights_sha256 = sha256_file(weights)
    network = load_network(weights, len(LABELS), OP_THRESHS)
    inputs = check_inputs()
    folder.mkdir(parents=True, exist_ok=True)
    target = export_path(folder, weights_sha256)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=folder) as tmp:
        partial = Path(tmp) / target.name
        with torch.inference_mode():
            expected = network(torch.from_numpy(inputs)).numpy()
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated in 2.9+
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                network,
                (torch.from_numpy(inputs[:1]),),
                str(partial),
                dynamo=False,  # the TorchScript exporter: no onnxscript, one file
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
            )
        session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        # one batch of all and each alone: the batch axis must not change the scores
        batch = session.run(None, {INPUT_NAME: inputs})[0]
        alone = np.concatenate([session.run(None, {INPUT_NAME: x[None]})[0] for x in inputs])
        diff = float(max(np.abs(batch - expected).max(), np.abs(alone - expected).max()))
        if not diff <= TOLERANCE:
            raise ModelError(
                f"the ONNX export of {weights} gives scores {diff:.2e} from torch's "
                f"(at most {TOLERANCE:g} allowed); the service runs it on torch"
            )
        record = ExportRecord(
            weights_sha256=weights_sha256,
            onnx_sha256=sha256_file(partial),
            onnxruntime=runtime_version(),
            torch=torch.__version__,
            opset=OPSET,
            max_abs_diff=diff,
            tolerance=TOLERANCE,
        )
        os.replace(partial, target)
        record_tmp = Path(tmp) / "record.json"
        record_tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
        os.replace(record_tmp, _record_path(target))
    return target, record


def export_in_child(
    weights: Path, folder: Path, timeout: float = EXPORT_TIMEOUT_SECONDS
) -> tuple[Path, ExportRecord]:
    """:func:`export` in a child process (it imports torch; this process does not). Raises
    :class:`ModelError` with the child's last line when it fails."""
    command = [sys.executable, "-m", "service.models.cxr_onnx", str(weights), str(folder)]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"exporting {weights} to ONNX took over {timeout:g} s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit {done.returncode}"
        raise ModelError(f"cannot export {weights} to ONNX: {last}")
    found = valid_export(folder, sha256_file(weights))
    if found is None:
        raise ModelError(f"the ONNX export of {weights} in {folder} is not valid after export")
    return found


class OnnxNetwork:
    """The exported network in an ONNX Runtime session on the CPU."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: one per physical core
        # idle pool threads sleep instead of spinning between operators: on cores shared
        # with the workers, spinning threads stalled the forward (as OMP_WAIT_POLICY for torch)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.path = path
        self.runtime = f"onnxruntime {runtime_version()}"

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """Scores (N, classes) for a batch (N, 1, 224, 224)."""
        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        out: np.ndarray = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        return out


def main(argv: list[str] | None = None) -> int:
    """``python -m service.models.cxr_onnx WEIGHTS FOLDER``: export and check (the child
    process of :func:`export_in_child`); prints the export's path and largest difference."""
    weights, folder = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        path, record = export(weights, folder)
    except ModelError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{path} max |score difference| {record.max_abs_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
