"""Chest radiograph classifier: torchxrayvision DenseNet-121 ``densenet121-res224-all``.

The weights are the file torchxrayvision publishes, loaded once, in a background thread of
the service process, the way torchxrayvision loads it (:mod:`service.models.cxr_net`).
Pixels are prepared from the DICOM data exactly as torchxrayvision expects: stored values
through the Modality LUT (PS3.3 C.11.1), MONOCHROME1 inverted (PS3.3 C.7.6.3.1.2), scaled
to [-1024, 1024] from the bit depth in the header, centre-cropped to a square and resized
to 224 x 224.

This module imports neither torch nor torchxrayvision: worker processes unpickle the model
from it to prepare and finish studies, and start in about a second without them. The
constants torchxrayvision's ``model_urls`` holds for these weights are copied here
(``tests/test_cxr.py`` checks them against torchxrayvision's).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import threading
import time
import urllib.request
import warnings
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit
from scipy import sparse

from service.config import CxrConfig
from service.errors import InputError, ModelError, ModelNotReady
from service.models.base import Applicability, ModelResult, Prepared, RunContext
from service.models.derived import LossyHistory, lossy_history
from service.models.dicomio import read_dicom
from service.models.pixels import decode_pixels, undecodable_reason
from service.values import Instance, Study

logger = logging.getLogger(__name__)

NAME = "cxr-densenet121"
WEIGHTS_NAME = "densenet121-res224-all"
FETCH_HINT = "python main.py models fetch"
INPUT_SIZE = 224

#: torchxrayvision's ``model_urls["densenet121-res224-all"]``: the published file, the
#: labels in output order and the operating thresholds.
WEIGHTS_URL = (
    "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-"
    "seed0-best.pt"
)
#: The published file's sha256 as public projects quote it (not checked here: the file
#: cannot be downloaded on the development machine); printed when a download fails.
PUBLISHED_SHA256 = "56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899"
LABELS = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
OP_THRESHS = (
    0.07422872,
    0.038290843,
    0.09814756,
    0.0098118475,
    0.023601074,
    0.0022490358,
    0.010060724,
    0.103246614,
    0.056810737,
    0.026791653,
    0.050318155,
    0.023985857,
    0.01939503,
    0.042889766,
    0.053369623,
    0.035975814,
    0.20204692,
    0.05015312,
)
#: torchxrayvision's cache folder (``xrv.utils.get_cache_dir()``).
XRV_CACHE = Path("~/.torchxrayvision/models_data")

#: SOP classes accepted (PS3.4 B.5): CR, DX For Presentation, Secondary Capture.
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SOP_CLASSES = {CR_IMAGE, DX_PRESENTATION, SECONDARY_CAPTURE}
MODALITIES = {"CR", "DX"}
#: Body Part Examined (0018,0015): CHEST is the defined term (PS3.16 Annex L); a missing
#: value is accepted. THORAX is not a defined term and is refused (the one sample using it
#: is a veterinary lateral view).
BODY_PARTS = {"CHEST", ""}
#: View Position (0018,5101) values the model was trained on; missing is accepted.
VIEWS = {"PA", "AP", ""}


class Network(Protocol):
    """A loaded network: :class:`service.models.cxr_net.Network` (torch) or
    :class:`service.models.cxr_onnx.OnnxNetwork` (ONNX Runtime)."""

    runtime: str  # what runs the forward, e.g. "onnxruntime 1.32.0", "torch 2.14.1 cpu"

    def forward(self, inputs: np.ndarray) -> np.ndarray: ...


#: Present on a machine (or in a container) that has an NVIDIA GPU and its driver.
NVIDIA_DEVICE = Path("/dev/nvidiactl")


def default_weights_path() -> Path:
    """Where torchxrayvision caches the published file (``~/.torchxrayvision/models_data``)."""
    return XRV_CACHE.expanduser() / os.path.basename(WEIGHTS_URL)


def weights_path(config: CxrConfig) -> Path:
    """The configured weights file, or torchxrayvision's cache location."""
    return Path(config.weights).expanduser() if config.weights else default_weights_path()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_weights(config: CxrConfig, url: str = WEIGHTS_URL, timeout: float = 30.0) -> Path:
    """Download the published weights to :func:`weights_path` (atomically: a temporary
    file beside it, then a rename). A failed download raises :class:`ModelError` whose
    message is two lines: what failed, and how to place the file by hand instead."""
    target = weights_path(config)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            try:
                with (
                    urllib.request.urlopen(url, timeout=timeout) as answer,
                    open(partial, "wb") as out,
                ):
                    for block in iter(lambda: answer.read(1 << 20), b""):
                        out.write(block)
            except OSError as exc:  # URLError, HTTPError, timeouts are OSErrors
                reason = getattr(exc, "reason", None) or exc
                raise ModelError(
                    f"cannot download the CXR weights from {url}: {reason}\n"
                    f"place the file by hand at {target} (published sha256 "
                    f"{PUBLISHED_SHA256}) or set models.cxr.weights (GATEWAY_CXR_WEIGHTS) "
                    "to its path"
                ) from None
            os.replace(partial, target)
    if config.sha256 and sha256_file(target) != config.sha256:
        raise ModelError(f"{target}: sha256 differs from models.cxr.sha256")
    return target


def prepare_export(config: CxrConfig) -> str:
    """``models fetch``'s second step: the checked ONNX export beside the weights, when the
    forward will run on ONNX Runtime (made here, so that no service start makes it); a line
    saying what is ready. Raises :class:`ModelError` when the export fails its check."""
    model = CxrModel(config, load=False)
    if model.runtime_choice() != "onnxruntime":
        return "the forward runs on torch here (models.cxr.runtime, device): no ONNX export"
    from service.models.cxr_onnx import export, valid_export

    folder = model.weights_path.parent
    path, record = valid_export(folder, model.sha256) or export(model.weights_path, folder)
    return f"ONNX export ready: {path} (scores within {record.max_abs_diff:.1e} of torch's)"


def warm_up() -> None:
    """Load highdicom's tables of the standard once per process (see cxr_outputs)."""
    from service.models.cxr_outputs import warm_up as load_tables

    load_tables()


# -- DICOM in ------------------------------------------------------------------------------


#: Homo sapiens in CID 7454 "Animal Taxonomic Rank Values" (PS3.16), from pydicom's tables.
HUMAN = codes.cid7454.HomoSapiens
#: Patient Species Description (0010,2201) values meaning a human subject (case ignored).
HUMAN_DESCRIPTIONS = {HUMAN.meaning.lower(), "human"}


def species_reason(ds: Dataset) -> str:
    """Why the patient of ``ds`` is not known to be human; "" when human or unstated.

    Patient Species Description (0010,2201) and Patient Species Code Sequence (0010,2202)
    are Type 1C, required when the patient is an animal (PS3.3 C.7.1.1); absent, the
    patient is human. The model was trained on human chest radiographs only.
    """
    for item in ds.get("PatientSpeciesCodeSequence", []) or []:
        scheme, value = str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", ""))
        if (scheme, value) != (HUMAN.scheme_designator, HUMAN.value):
            meaning = str(item.get("CodeMeaning", "") or value)
            return f"PatientSpeciesCodeSequence is {meaning} ({scheme} {value}), not human"
    description = " ".join(str(ds.get("PatientSpeciesDescription", "") or "").split())
    if description and description.lower() not in HUMAN_DESCRIPTIONS:
        return f"PatientSpeciesDescription is {description!r}, not human"
    return ""


def check_header(ds: Dataset) -> str:
    """Why ``ds`` is not a single-frame PA/AP chest radiograph of a human; "" when it is."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    body_part = str(ds.get("BodyPartExamined", "") or "").upper().strip()
    view = str(ds.get("ViewPosition", "") or "").upper().strip()
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if sop_class not in SOP_CLASSES:
        return f"SOP class {sop_class} is not CR, DX for presentation or secondary capture"
    species = species_reason(ds)
    if species:
        return species
    if modality not in MODALITIES:
        return f"Modality {modality or '(none)'} is not CR or DX"
    if body_part not in BODY_PARTS:
        return f"BodyPartExamined {body_part} is not CHEST"
    if view not in VIEWS:
        return f"ViewPosition {view} is not PA or AP (lateral and other views are not supported)"
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return "multi-frame image; a single 2-D radiograph is expected"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        return f"PhotometricInterpretation {photometric or '(none)'} is not MONOCHROME1/2"
    if "BitsStored" not in ds:
        return "no BitsStored in the header: not an image"
    return undecodable_reason(ds)


def check_instance(inst: Instance) -> str:
    """Why ``inst`` does not apply ("" when it does), from its header only."""
    if inst.modality.upper() not in MODALITIES:
        return f"Modality {inst.modality or '(none)'} is not CR or DX"
    if inst.frames != 1:
        return "multi-frame image; a single 2-D radiograph is expected"
    try:
        return check_header(read_dicom(inst.path, stop_before_pixels=True))
    except InputError as exc:
        return str(exc)


#: Decoders tried first for these transfer syntaxes (PS3.5 A.4): they give the same pixels
#: as pydicom's default choice, faster (libjpeg-turbo through Pillow for 8-bit JPEG Baseline,
#: about 5x; OpenJPEG through pylibjpeg for JPEG 2000, about 15 %). On any failure every
#: available decoder is tried, as without a preference.
PREFERRED_DECODERS: dict[str, str] = {
    JPEGBaseline8Bit: "pillow",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
}


def decode(ds: Dataset) -> np.ndarray:
    """The stored pixel values of ``ds``, with the preferred decoder where there is one."""
    reason = undecodable_reason(ds)
    if reason:
        raise InputError(reason)
    plugin = PREFERRED_DECODERS.get(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if plugin:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return np.asarray(ds.pixel_array)
        except Exception as exc:
            logger.debug("%s decoder failed (%s); trying every decoder", plugin, exc)
            ds.pixel_array_options()
    return decode_pixels(ds)


def stored_range(ds: Dataset) -> tuple[float, float]:
    """The range of values the Modality LUT can output, from the header (PS3.3 C.11.1)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    if "ModalityLUTSequence" in ds:
        descriptor = ds.ModalityLUTSequence[0].LUTDescriptor
        return 0.0, float(2 ** int(descriptor[2]) - 1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def to_xrv_range(ds: Dataset) -> np.ndarray:
    """The 2-D image in [-1024, 1024], MONOCHROME2 sense (bright = dense), float32.

    For unsigned data without rescaling this is ``xrv.utils.read_xray_dcm``: MONOCHROME1 is
    ``maxval - x`` with ``maxval = 2**BitsStored - 1``, then ``xrv.utils.normalize``.
    """
    pixels = decode(ds)
    if pixels.ndim != 2:
        raise InputError(f"pixel data has shape {pixels.shape}; a 2-D image is expected")
    low, high = stored_range(ds)
    if pixels.dtype.kind in "ui" and _identity_modality_lut(ds):
        # stored values are the output (every real radiograph here): clipped in their own
        # integer type, then one float32 buffer worked in place, exact below 2**24, as xrv
        # computes: a 1955x1841 image took 5 new 14 MB arrays (and their page faults) more
        values = np.clip(pixels, int(low), int(high)).astype(np.float32)
    else:
        values = np.clip(np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64), low, high)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = np.subtract(high, values, out=values)
    else:
        values -= low
    return normalize(values, high - low)


def normalize(image: np.ndarray, maxval: float) -> np.ndarray:
    """``xrv.utils.normalize``: [0, maxval] to [-1024, 1024] in float32, step by step as it
    computes (``(2 * (x / maxval) - 1) * 1024``), in place when ``image`` is float32."""
    if image.max() > maxval:
        raise InputError(f"max image value ({image.max()}) higher than expected ({maxval})")
    out = image.astype(np.float32, copy=False)
    out /= np.float32(maxval)
    out *= 2
    out -= 1
    out *= 1024
    return out


def _identity_modality_lut(ds: Dataset) -> bool:
    """Whether the Modality LUT leaves stored values unchanged: no LUT Sequence, slope 1 and
    intercept 0 or absent (PS3.3 C.11.1)."""
    return (
        "ModalityLUTSequence" not in ds
        and float(ds.get("RescaleSlope", 1) or 1) == 1.0
        and float(ds.get("RescaleIntercept", 0) or 0) == 0.0
    )


def model_input(image: np.ndarray) -> np.ndarray:
    """xrv's transforms: centre crop to a square, resize to 224 (skimage); (1, 224, 224).

    A square larger than 224 (every real radiograph) takes :func:`_downsample`, which
    computes what skimage's ``resize`` computes for it, only at the pixels the result uses.
    """
    cropped = center_crop(image[None, ...])
    if cropped.shape[1] <= INPUT_SIZE or cropped.dtype != np.float32:
        from skimage.transform import resize  # xrv.datasets.XRayResizer(224)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            size = (1, INPUT_SIZE, INPUT_SIZE)
            resized = resize(cropped, size, mode="constant", preserve_range=True)  # type: ignore[no-untyped-call]
        return np.asarray(resized, dtype=np.float32)
    return _downsample(cropped[0])[None, ...]


def center_crop(image: np.ndarray) -> np.ndarray:
    """``xrv.datasets.XRayCenterCrop``: the centred square of a (1, rows, columns) image."""
    _, y, x = image.shape
    size = min(y, x)
    top, left = y // 2 - size // 2, x // 2 - size // 2
    return image[:, top : top + size, left : left + size]


@dataclass(frozen=True)
class _Resize:
    """skimage's ``resize`` of one axis of ``size`` > 224 pixels, as operators: the Gaussian
    anti-aliasing filter (scipy ``gaussian_filter``: sigma ``(size/224 - 1)/2``, radius
    ``int(4 sigma + 0.5)``, zero outside) evaluated only at the input pixels that the linear
    interpolation (scipy ``zoom``, ``order=1``, ``grid_mode=True``) reads."""

    gaussian: sparse.csr_array  # (pixels read, size)
    lower: np.ndarray  # per output pixel: index into the pixels read, and its weight
    upper: np.ndarray
    fraction: np.ndarray

    def interpolate(self, values: np.ndarray) -> np.ndarray:
        """Linear interpolation along axis 0 of the filtered pixels, in double precision."""
        values = values.astype(np.float64)
        weight = self.fraction.reshape(-1, *([1] * (values.ndim - 1)))
        return np.asarray(values[self.lower] * (1.0 - weight) + values[self.upper] * weight)


@functools.lru_cache(maxsize=8)
def _resize_operators(size: int) -> _Resize:
    factor = size / INPUT_SIZE
    sigma = (factor - 1) / 2
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * taps**2)
    weights = weights / weights.sum()
    coords = (np.arange(INPUT_SIZE) + 0.5) * factor - 0.5  # all within [0, size - 1]
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)
    needed = np.unique(np.concatenate([lower, upper]))
    where = needed[:, None] + taps[None, :]
    inside = (where >= 0) & (where < size)
    gaussian = sparse.csr_array(
        (
            np.broadcast_to(weights, where.shape)[inside],
            (np.broadcast_to(np.arange(len(needed))[:, None], where.shape)[inside], where[inside]),
        ),
        shape=(len(needed), size),
    )
    return _Resize(
        gaussian,
        np.searchsorted(needed, lower),
        np.searchsorted(needed, upper),
        coords - lower,
    )


def _downsample(square: np.ndarray) -> np.ndarray:
    """skimage ``resize(square, (224, 224), mode="constant", preserve_range=True)`` of a
    float32 square larger than 224 pixels: the same steps and float32 roundings (filter
    along rows, then along columns, then interpolate), in double precision in between."""
    op = _resize_operators(square.shape[0])
    rows = np.asarray(op.gaussian @ square.astype(np.float64), dtype=np.float32)
    both = np.asarray(op.gaussian @ rows.T.astype(np.float64), dtype=np.float32)
    out = op.interpolate(op.interpolate(both).T).astype(np.float32)
    low, high = float(square.min()), float(square.max())
    if not low <= 0.0 <= high and out.min() <= 0.0 <= out.max():
        low, high = min(low, 0.0), max(high, 0.0)  # skimage keeps the zero padding value
    return np.clip(out, np.float32(low), np.float32(high))


@dataclass
class Radiograph:
    """One applicable instance, read and prepared (small enough to pass between processes:
    the header without Pixel Data, the 8-bit display image and the model input)."""

    instance: Instance
    dataset: Dataset  # the header, without Pixel Data
    display: np.ndarray  # 8-bit MONOCHROME2, DISPLAY_WIDTH wide: the summary image's base
    input: np.ndarray  # (1, 224, 224)
    #: the source's lossy compression, carried to the summary image (PS3.3 C.7.6.1.1.5)
    lossy: LossyHistory | None = None

    @property
    def view_position(self) -> str:
        return str(self.dataset.get("ViewPosition", "") or "")


def load_radiograph(inst: Instance) -> Radiograph:
    from service.models.cxr_outputs import display_image

    ds = read_dicom(inst.path)
    reason = check_header(ds)
    if reason:
        raise InputError(reason)
    image = to_xrv_range(ds)
    lossy = lossy_history(ds)
    del ds.PixelData
    return Radiograph(inst, ds, display_image(image), model_input(image), lossy)


# -- the model -----------------------------------------------------------------------------


class CxrModel:
    """The ``cxr-densenet121`` model: 18 findings per PA/AP chest radiograph.

    Construction checks the weights file (present, sha256) at once and starts loading the
    network in a background thread, so that the service takes studies while it loads:
    :meth:`ready` is true while it loads, :attr:`loading` says whether it still does, and
    :meth:`forward` waits for it. Missing or mismatched weights load nothing (no torch
    import) and :meth:`ready` gives the reason.
    """

    name = NAME

    def __init__(
        self, config: CxrConfig, *, load: bool = True, export_dir: Path | None = None
    ) -> None:
        self.config = config
        self.weights_path = weights_path(config)
        #: where the service keeps its ONNX export (``STATE/models``) when there is none
        #: beside the weights (:meth:`_load_onnx`)
        self.export_dir = export_dir
        self.runtime = ""  # what runs the forward, once loaded
        self.sha256 = ""
        self.network: Network | None = None
        self.load_seconds = 0.0  # how long the network took to load (in its thread)
        self._not_ready = ""
        self._loaded = threading.Event()
        self._check()
        self.version = f"xrv{package_version('torchxrayvision')}-{self.sha256[:12] or 'noweights'}"
        if self._not_ready or not load:  # not load: routing only, never run here
            self._loaded.set()
        else:
            # idle OpenMP threads sleep at once instead of spinning (libgomp reads it when
            # the thread below first imports torch; an operator's value stands): on cores
            # shared with the workers or other processes, the forward's two threads spun at
            # each of the network's parallel regions for a descheduled member of their team,
            # and the forward ran 3-20x slower (README, Performance)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            # not a daemon: a process that ends while torch is still loading waits for it
            # (torch's C++ state torn down under a running load aborts the process)
            threading.Thread(target=self._load, name="cxr-load", daemon=False).start()

    def _check(self) -> None:
        """The weights file exists and has the pinned digest; else why not (nothing loads)."""
        path = self.weights_path
        if not path.is_file():
            self._not_ready = f"weights file {path} is missing; fetch it with `{FETCH_HINT}`"
            return
        self.sha256 = sha256_file(path)
        if self.config.sha256 and self.sha256 != self.config.sha256:
            self._not_ready = (
                f"weights file {path} has sha256 {self.sha256}, "
                f"but models.cxr.sha256 is {self.config.sha256}"
            )
            return
        if not self.config.sha256:
            logger.warning("models.cxr.sha256 is not set: weights %s are not pinned", path)

    def _load(self) -> None:
        """Load the network on the runtime :meth:`runtime_choice` names."""
        t0 = time.monotonic()
        try:
            self.network = self._load_network()
            self.runtime = self.network.runtime
            self.load_seconds = time.monotonic() - t0
            logger.info("model %s loaded in %.1f s (%s)", NAME, self.load_seconds, self.runtime)
        except Exception as exc:
            self._not_ready = (
                f"cannot load weights file {self.weights_path}: {type(exc).__name__}: {exc}"
            )
            logger.error("%s", self._not_ready)
        finally:
            self._loaded.set()

    def runtime_choice(self) -> str:
        """``models.cxr.runtime``; ``auto`` is ONNX Runtime when the forward runs on the CPU
        (``device`` cpu, or auto on a machine without :data:`NVIDIA_DEVICE`) and it is
        installed, torch otherwise."""
        if self.config.runtime != "auto":
            return self.config.runtime
        from service.models.cxr_onnx import runtime_version

        device = self.config.device
        on_cpu = device == "cpu" or (device == "auto" and not NVIDIA_DEVICE.exists())
        return "onnxruntime" if on_cpu and runtime_version() else "torch"

    def _load_network(self) -> Network:
        if self.runtime_choice() == "onnxruntime":
            try:
                return self._load_onnx()
            except ModelError as exc:
                if self.config.runtime == "onnxruntime":
                    raise
                logger.warning("%s; the forward runs on torch instead", exc)
        from service.models.cxr_net import load

        # on one torch thread, leaving the OpenMP team to the thread that runs the forward
        return load(
            self.weights_path, len(LABELS), OP_THRESHS, self.config.device, self.config.threads
        )

    def _load_onnx(self) -> Network:
        """The checked ONNX export of these weights: beside the weights (``models fetch``
        puts it there), else in :attr:`export_dir`, else exported there now in a child
        process (once per weights; this process never imports torch)."""
        from service.models.cxr_onnx import OnnxNetwork, export_in_child, valid_export

        folders = [self.weights_path.parent, *([self.export_dir] if self.export_dir else [])]
        found = next(filter(None, (valid_export(f, self.sha256) for f in folders)), None)
        if found is None:
            target = folders[-1]
            logger.info("exporting model %s to ONNX in %s (once for these weights)", NAME, target)
            found = export_in_child(self.weights_path, target)
        path, record = found
        logger.info(
            "model %s runs %s, scores within %.1e of torch's on its check inputs",
            NAME,
            path,
            record.max_abs_diff,
        )
        return OnnxNetwork(path, self.config.threads)

    @property
    def loading(self) -> bool:
        """Whether the network is still loading (studies are prepared meanwhile)."""
        return not self._loaded.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait until the network loaded or failed to; False on timeout."""
        return self._loaded.wait(timeout)

    @property
    def pathologies(self) -> list[str]:
        """The model's findings in output order."""
        return list(LABELS)

    @property
    def thresholds(self) -> dict[str, float]:
        """The operating thresholds on the sigmoid output (a score of 0.5 after op_norm)."""
        return dict(zip(LABELS, OP_THRESHS, strict=True))

    def ready(self) -> Applicability:
        """Ready once the weights check passed, also while the network still loads."""
        if self._not_ready:
            return Applicability(False, self._not_ready)
        return Applicability(True)

    def applies(self, study: Study) -> Applicability:
        reasons = {i.sop_instance_uid: check_instance(i) for i in study.instances}
        if any(not reason for reason in reasons.values()):
            return Applicability(True)
        if not reasons:
            return Applicability(False, "no instances")
        return Applicability(
            False,
            "no PA/AP chest radiograph: "
            + "; ".join(f"{uid}: {why}" for uid, why in sorted(reasons.items())),
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for worker processes without the network: they only prepare and finish."""
        state = dict(self.__dict__)
        state["network"] = None
        state["_loaded"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded = threading.Event()
        self._loaded.set()  # a copy never loads the network

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """Scores (N, 18) for a batch (N, 1, 224, 224): ``model(x)`` of torchxrayvision;
        waits for the network to load."""
        self._loaded.wait()
        if self.network is None:
            raise ModelNotReady(self._not_ready or f"{NAME}: the network is not loaded here")
        return self.network.forward(inputs)

    predict = forward

    def scores(self, row: np.ndarray) -> dict[str, float]:
        return {p: float(v) for p, v in zip(LABELS, row, strict=True)}

    def prepare(self, study: Study, ctx: RunContext) -> Prepared:
        """Read and preprocess every applicable radiograph; the others are skipped."""
        skipped: dict[str, str] = {}
        images: list[Radiograph] = []
        for inst in study.instances:
            reason = check_instance(inst)
            if not reason:
                try:
                    images.append(load_radiograph(inst))
                    continue
                except InputError as exc:
                    reason = str(exc)
            skipped[inst.sop_instance_uid] = reason
            logger.info("cxr skips %s: %s", inst.sop_instance_uid, reason)
        if not images:
            raise ModelError("no applicable PA/AP chest radiograph in the study")
        return Prepared(np.stack([r.input for r in images]), (images, skipped))

    def finish(self, prepared: Prepared, outputs: np.ndarray, ctx: RunContext) -> ModelResult:
        """The SR and summary images from the forward output rows of ``prepared``."""
        from service.models.cxr_outputs import build_outputs

        images, skipped = prepared.state
        results = [(r, self.scores(row)) for r, row in zip(images, outputs, strict=True)]
        datasets = build_outputs(self, results, ctx)
        findings: dict[str, Any] = {
            "model": self.name,
            "version": self.version,
            "weights_sha256": self.sha256,
            "view_position": {r.instance.sop_instance_uid: r.view_position for r in images},
            "images": {r.instance.sop_instance_uid: s for r, s in results},
            "positive": {
                r.instance.sop_instance_uid: [p for p, v in s.items() if v >= 0.5]
                for r, s in results
            },
        }
        return ModelResult(datasets=datasets, findings=findings, skipped_instances=skipped)

    def run(self, study: Study, ctx: RunContext) -> ModelResult:
        self._loaded.wait()
        if self.network is None:
            raise ModelNotReady(self._not_ready)
        prepared = self.prepare(study, ctx)
        return self.finish(prepared, self.forward(prepared.inputs), ctx)
