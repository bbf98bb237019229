"""The chest X-ray model on real radiographs, against torchxrayvision's own pipeline.

The published weights cannot be downloaded here, so a checkpoint in the same file format
(a whole pickled ``xrv.models.DenseNet``, as ``torch.save(model)`` writes it) is made from a
random initialisation; the loading, preprocessing and inference code is the real one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torchxrayvision as xrv
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ImplicitVRLittleEndian

from service.config import CxrConfig
from service.errors import ModelError, ModelNotReady
from service.models import cxr_onnx
from service.models.base import RunContext
from service.models.cxr import (
    INPUT_SIZE,
    LABELS,
    OP_THRESHS,
    PREFERRED_DECODERS,
    PUBLISHED_SHA256,
    WEIGHTS_NAME,
    WEIGHTS_URL,
    CxrModel,
    decode,
    default_weights_path,
    fetch_weights,
    load_radiograph,
    model_input,
    to_xrv_range,
)
from service.models.dicomio import read_dicom
from service.uids import UidFactory
from service.values import Instance, Study
from tests.conftest import shared_file

pytestmark = pytest.mark.filterwarnings("ignore:Converting MONOCHROME1:UserWarning")

ROOT = "1.2.826.0.1.3680043.8.498."
CXR = ("siim-cr-pa-jpeg.dcm", "siim-cr-pa-monochrome1.dcm", "nema-rg1-pa-j2k.dcm")
NOMETA = "cr-mono1-chest-nometa"
NEGATIVES = ("dx-thorax-lateral-small.dcm", "cr-leg-j2k-lossless.dcm")
PUBLISHED_NAME: str = os.path.basename(xrv.models.model_urls[WEIGHTS_NAME]["weights_url"])


def write_checkpoint(folder: Path, *, export: bool = True) -> Path:
    """A random DenseNet-121 saved like the published file: the whole pickled module, with
    (``export``) its checked ONNX export beside it, as ``models fetch`` leaves them.

    Batch-norm statistics and the classifier are perturbed so the scores spread out.
    """
    torch.manual_seed(1500)
    model = xrv.models.DenseNet(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        model.classifier.weight.mul_(0.01)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PUBLISHED_NAME
    torch.save(model, path)
    if export:
        cxr_onnx.export(path, folder)
    return path


def instance(path: Path) -> Instance:
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    return Instance(
        path=path,
        size=path.stat().st_size,
        sha256="",
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        modality=str(ds.get("Modality", "")),
        body_part=str(ds.get("BodyPartExamined", "") or ""),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def study_of(*paths: Path) -> Study:
    instances = [instance(p) for p in paths]
    return Study("1", instances[0].study_instance_uid, paths[0].parent, instances)


def xrv_reference_input(path: Path) -> np.ndarray:
    """torchxrayvision's own DICOM reader, then its crop and resize transforms."""
    image = xrv.utils.read_xray_dcm(path)
    image = xrv.datasets.XRayCenterCrop()(image[None, ...])
    return np.asarray(xrv.datasets.XRayResizer(224)(image))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("xrv-cache"))


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> CxrModel:
    return CxrModel(CxrConfig(weights=str(checkpoint), device="cpu"))


@pytest.mark.parametrize("name", CXR)
def test_preprocessing_equals_xrv_reference(name: str) -> None:
    path = shared_file(f"cxr/{name}")
    ours = load_radiograph(instance(path)).input
    assert ours.shape == (1, 224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, xrv_reference_input(path), rtol=0, atol=1e-4)


def test_monochrome1_copy_is_the_negated_image() -> None:
    """Same stored pixels, MONOCHROME1 header: inverted in the 8-bit stored range (255 - x),
    so after xrv's scaling the image is exactly the negative of the MONOCHROME2 one."""
    mono2 = read_dicom(shared_file("cxr/siim-cr-pa-jpeg.dcm"))
    mono1 = read_dicom(shared_file("cxr/siim-cr-pa-monochrome1.dcm"))
    assert np.array_equal(mono1.pixel_array, mono2.pixel_array)
    image2, image1 = to_xrv_range(mono2), to_xrv_range(mono1)
    np.testing.assert_allclose(image1, -image2, rtol=0, atol=1e-3)  # float32 rounding
    np.testing.assert_allclose(model_input(image1), -model_input(image2), atol=1e-3)


@pytest.mark.parametrize("name", CXR)
def test_a_linear_modality_rescale_gives_the_same_image(name: str) -> None:
    """Stored values and a Rescale Slope/Intercept (PS3.3 C.11.1) scale the range from the
    header as much as the pixels: the same image whether rescaled (the float64 path) or
    not (stored integers, float32)."""
    plain = read_dicom(shared_file(f"cxr/{name}"))
    rescaled = read_dicom(shared_file(f"cxr/{name}"))
    rescaled.RescaleSlope, rescaled.RescaleIntercept = "2.5", "-100"
    np.testing.assert_allclose(to_xrv_range(rescaled), to_xrv_range(plain), rtol=0, atol=1e-3)


def test_j2k_15_bit_scaled_from_header_bit_depth() -> None:
    ds = read_dicom(shared_file("cxr/nema-rg1-pa-j2k.dcm"))
    assert ds.BitsStored == 15 and ds.PhotometricInterpretation == "MONOCHROME1"
    pixels = ds.pixel_array.astype(np.float64)
    expected = (2 * ((32767 - pixels) / 32767) - 1) * 1024
    np.testing.assert_allclose(to_xrv_range(ds), expected, atol=1e-3)


def test_stream_without_file_meta_decodes() -> None:
    path = shared_file(f"cxr/{NOMETA}")
    ds = read_dicom(path)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert ds.BitsStored == 10
    pixels = ds.pixel_array.astype(np.float32)
    image = xrv.utils.normalize(1023 - pixels, 1023)  # read_xray_dcm's steps
    image = xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(image[None, ...]))
    np.testing.assert_allclose(load_radiograph(instance(path)).input, image, atol=1e-4)


@pytest.mark.parametrize(("runtime", "bound"), [("torch", 1e-5), ("onnxruntime", 1e-3)])
def test_scores_equal_torchxrayvision_model(checkpoint: Path, runtime: str, bound: float) -> None:
    """One batch of every radiograph through the service equals xrv's ``model(x)`` with the
    weights loaded by xrv itself from the same file (its cache folder): on torch op for op,
    on ONNX Runtime within the bound its export is checked to (``cxr_onnx.TOLERANCE``)."""
    model = CxrModel(CxrConfig(weights=str(checkpoint), device="cpu", runtime=runtime))
    paths = [shared_file(f"cxr/{name}") for name in CXR]
    ours = model.predict(np.stack([load_radiograph(instance(p)).input for p in paths]))
    assert model.runtime.startswith(runtime)
    reference = xrv.models.DenseNet(weights=WEIGHTS_NAME, cache_dir=str(checkpoint.parent))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(np.stack([xrv_reference_input(p) for p in paths])))
    assert ours.shape == (3, 18)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=bound)
    assert np.ptp(ours) > 0.01  # the scores are not saturated constants


def test_run_batches_chest_images_and_skips_negatives(model: CxrModel) -> None:
    chest = shared_file("cxr/siim-cr-pa-jpeg.dcm")
    negatives = [shared_file(f"negative/{name}") for name in NEGATIVES]
    study = study_of(chest, *negatives)
    assert model.applies(study).ok
    result = model.run(study, RunContext(UidFactory(ROOT, "1", study.study_uid), run_id=1))
    skipped = result.skipped_instances
    reasons = {p.name: skipped[instance(p).sop_instance_uid] for p in negatives}
    assert "THORAX" in reasons["dx-thorax-lateral-small.dcm"]
    assert "EXTREMITY" in reasons["cr-leg-j2k-lossless.dcm"]
    sop = instance(chest).sop_instance_uid
    findings = json.loads(json.dumps(result.findings))
    assert findings["view_position"] == {sop: "PA"}
    assert set(findings["images"][sop]) == set(model.pathologies)
    assert len(model.pathologies) == 18
    assert findings["positive"][sop] == [p for p, v in findings["images"][sop].items() if v >= 0.5]
    assert findings["weights_sha256"] == model.sha256
    assert len(result.datasets) == 2  # the SR and one summary image


def test_negatives_do_not_apply_and_run_refuses(model: CxrModel) -> None:
    study = study_of(*[shared_file(f"negative/{name}") for name in NEGATIVES])
    verdict = model.applies(study)
    assert not verdict.ok
    assert "BodyPartExamined THORAX" in verdict.reason
    assert "BodyPartExamined EXTREMITY" in verdict.reason
    with pytest.raises(ModelError, match="no applicable"):
        model.run(study, RunContext(UidFactory(ROOT, "x"), run_id=1))


def test_lateral_view_is_skipped(tmp_path: Path, model: CxrModel) -> None:
    ds = pydicom.dcmread(shared_file("cxr/siim-cr-pa-jpeg.dcm"))
    ds.ViewPosition = "LL"
    ds.save_as(tmp_path / "lateral.dcm")
    verdict = model.applies(study_of(tmp_path / "lateral.dcm"))
    assert not verdict.ok and "ViewPosition LL" in verdict.reason


def test_missing_weights_not_ready_names_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / PUBLISHED_NAME
    model = CxrModel(CxrConfig(weights=str(missing)))
    verdict = model.ready()
    assert not verdict.ok
    assert str(missing) in verdict.reason and "python main.py models fetch" in verdict.reason
    with pytest.raises(ModelNotReady):
        model.run(study_of(shared_file("cxr/siim-cr-pa-jpeg.dcm")), RunContext(UidFactory(ROOT), 1))


def test_sha256_mismatch_not_ready(checkpoint: Path, model: CxrModel) -> None:
    wrong = CxrModel(CxrConfig(weights=str(checkpoint), sha256="0" * 64))
    assert not wrong.ready().ok
    assert "sha256" in wrong.ready().reason and str(checkpoint) in wrong.ready().reason
    pinned = CxrModel(CxrConfig(weights=str(checkpoint), sha256=model.sha256))
    assert pinned.ready().ok


def test_version_follows_weights(model: CxrModel) -> None:
    assert model.name == "cxr-densenet121"
    assert model.version == f"xrv{xrv.__version__}-{model.sha256[:12]}"


def test_default_weights_path_is_xrv_cache() -> None:
    path = default_weights_path()
    assert path.name == PUBLISHED_NAME
    assert path.parent == Path(xrv.utils.get_cache_dir())


def test_constants_are_torchxrayvisions() -> None:
    """The labels, thresholds and file the service copies from xrv's ``model_urls``."""
    spec = xrv.models.model_urls[WEIGHTS_NAME]
    assert list(LABELS) == spec["labels"]
    assert list(OP_THRESHS) == spec["op_threshs"]
    assert spec["weights_url"] == WEIGHTS_URL
    assert spec["input_resolution"] == INPUT_SIZE


IMPORTS_PROBE = """
import sys
from service.config import CxrConfig
from service.models.cxr import CxrModel

model = CxrModel(CxrConfig(weights=sys.argv[1], device="cpu", runtime=sys.argv[2]))
model.wait_loaded(120)
print(model.ready().reason or "ready")
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchxrayvision", "torchvision"}))
"""


def _probe(script: str, path: Path, *args: str) -> str:
    """What ``script`` prints, run in a fresh process from the repository root with
    ``path`` and ``args`` as its arguments."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, "-c", script, str(path), *args],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
        timeout=300,
    ).stdout


def imports_of_a_model(weights: Path, runtime: str = "auto") -> tuple[str, str]:
    """In a fresh process: the model's readiness and which of torch, torchxrayvision and
    torchvision it imported."""
    reason, modules = _probe(IMPORTS_PROBE, weights, runtime).splitlines()[-2:]
    return reason, modules


def test_missing_weights_import_no_torch(tmp_path: Path) -> None:
    """Without weights nothing loads: no torch import, no seconds spent, the reason given."""
    reason, modules = imports_of_a_model(tmp_path / PUBLISHED_NAME)
    assert "is missing" in reason and modules == "[]"


def test_the_network_loads_with_torch_alone(checkpoint: Path) -> None:
    """The published file loads without torchxrayvision (nor torchvision) in the process."""
    assert imports_of_a_model(checkpoint, "torch") == ("ready", "['torch']")


def test_on_the_cpu_the_service_process_never_imports_torch(checkpoint: Path) -> None:
    """Runtime auto on the CPU: the checked ONNX export runs, torch stays out."""
    assert imports_of_a_model(checkpoint) == ("ready", "[]")


def test_a_failed_download_says_in_two_lines_how_to_place_the_file(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/weights.pt"  # nothing listens there
    target = tmp_path / "models" / PUBLISHED_NAME
    with pytest.raises(ModelError) as failed:
        fetch_weights(CxrConfig(weights=str(target)), url=url, timeout=10)
    first, second = str(failed.value).splitlines()
    assert first.startswith(f"cannot download the CXR weights from {url}: ")
    assert str(target) in second and PUBLISHED_SHA256 in second
    assert "models.cxr.weights" in second
    assert list(target.parent.iterdir()) == []  # no partial file left


@pytest.mark.parametrize("shape", [(230, 230), (300, 1000), (1001, 999), (2100, 1700)])
def test_model_input_equals_xrv_transforms_for_any_size(shape: tuple[int, int]) -> None:
    """The fast resize path gives skimage's ``resize`` result (float32 rounding aside)."""
    image = np.random.default_rng(7).uniform(-1024, 1024, shape).astype(np.float32)
    image[: shape[0] // 3] = 1024.0  # saturated and flat regions, like real radiographs
    expected = xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(image[None, ...]))
    np.testing.assert_allclose(model_input(image), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", CXR)
def test_preferred_decoder_gives_the_default_decoders_pixels(name: str) -> None:
    path = shared_file(f"cxr/{name}")
    np.testing.assert_array_equal(decode(read_dicom(path)), read_dicom(path).pixel_array)


def test_unusable_preferred_decoder_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A preferred decoder that cannot decode (here: a plugin that is not installed) costs
    nothing but the attempt: every available decoder is then tried."""
    path = shared_file(f"cxr/{CXR[0]}")
    syntax = str(read_dicom(path).file_meta.TransferSyntaxUID)
    monkeypatch.setitem(PREFERRED_DECODERS, syntax, "no-such-plugin")
    np.testing.assert_array_equal(decode(read_dicom(path)), read_dicom(path).pixel_array)


OPENMP_PROBE = """
import os, sys, threading
import numpy as np
from service.config import CxrConfig
from service.models.cxr import CxrModel

def tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))

model = CxrModel(CxrConfig(weights=sys.argv[1], device="cpu", threads=2, runtime="torch"))
assert model.wait_loaded(120) and model.network is not None
for thread in threading.enumerate():  # the loading thread ends (its task may linger)
    if thread.name == "cxr-load":
        thread.join()
loaded = tasks()
model.forward(np.zeros((1, 1, 224, 224), np.float32))
print(len(tasks() - loaded))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_loading_leaves_the_openmp_team_to_the_forward_thread(checkpoint: Path) -> None:
    """The forward's first call starts the process's OpenMP team (threads - 1 workers):
    a team started while loading (in the background loading thread), in another thread
    than the engine's forward, made libgomp stop spin-waiting and the service's forward
    2.4x slower on 2 cores."""
    started_by_forward = int(_probe(OPENMP_PROBE, checkpoint).splitlines()[-1])
    assert started_by_forward == 1  # threads=2: the calling thread and one worker


WAIT_POLICY_PROBE = """
import os, sys
from service.config import CxrConfig
from service.models.cxr import CxrModel

model = CxrModel(CxrConfig(weights=sys.argv[1], device="cpu", runtime="torch"))
assert model.wait_loaded(120) and model.network is not None
print(os.environ.get("OMP_WAIT_POLICY", "unset"))
"""


@pytest.mark.parametrize(("operator", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_forward_threads_sleep_when_idle_unless_the_operator_says(
    checkpoint: Path, operator: str | None, seen: str
) -> None:
    """torch's OpenMP threads are loaded with OMP_WAIT_POLICY=PASSIVE (spinning threads
    stalled the forward 3-20x on cores shared with the workers); a value set stands."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if operator:
        env["OMP_WAIT_POLICY"] = operator
    done = subprocess.run(
        [sys.executable, "-c", WAIT_POLICY_PROBE, str(checkpoint)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        check=True,
        timeout=300,
    )
    assert done.stdout.splitlines()[-1] == seen


def chest_of(tmp_path: Path, name: str, **attributes: object) -> Path:
    """The real JPEG chest radiograph as a DX "CHEST AP" with ``attributes`` set."""
    ds = pydicom.dcmread(shared_file("cxr/siim-cr-pa-jpeg.dcm"))
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "AP"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name


def species_code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = code.value, code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def test_an_animal_is_not_run_through_the_human_chest_model(
    tmp_path: Path, model: CxrModel
) -> None:
    """Patient Species (PS3.3 C.7.1.1) other than Homo sapiens: not applicable, with why."""
    feline = chest_of(tmp_path, "cat.dcm", PatientSpeciesDescription="Feline")
    verdict = model.applies(study_of(feline))
    assert not verdict.ok and "PatientSpeciesDescription is 'Feline', not human" in verdict.reason
    coded = chest_of(
        tmp_path, "coded.dcm", PatientSpeciesCodeSequence=[species_code(codes.SCT.FelisCatus)]
    )
    verdict = model.applies(study_of(coded))
    assert not verdict.ok and "Felis catus (SCT 448169003), not human" in verdict.reason
    human = chest_of(
        tmp_path,
        "human.dcm",
        PatientSpeciesDescription="Homo sapiens",
        PatientSpeciesCodeSequence=[species_code(codes.SCT.HomoSapiens)],
    )
    assert model.applies(study_of(human)).ok
    assert model.applies(study_of(chest_of(tmp_path, "unstated.dcm"))).ok


def test_one_shot_run_on_an_animal_is_skipped_with_exit_3(tmp_path: Path, checkpoint: Path) -> None:
    from tests.helpers import run_cli, write_config

    config = write_config(
        tmp_path,
        extra=f'[models.cxr]\nweights = "{checkpoint}"\ndevice = "cpu"\n',
        rules='[{ model = "cxr-densenet121", modality = ["CR", "DX"] }]',
    )
    (tmp_path / "in").mkdir()
    chest_of(tmp_path / "in", "cat.dcm", PatientSpeciesDescription="Feline")
    proc = run_cli("--config", str(config), "run", str(tmp_path / "in"), str(tmp_path / "out"))
    assert proc.returncode == 3, proc.stderr
    assert "skipped:" in proc.stderr and "'Feline', not human" in proc.stderr
    assert not any((tmp_path / "out").glob("*.dcm"))
