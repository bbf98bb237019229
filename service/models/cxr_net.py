"""The network of torchxrayvision's ``densenet121-res224-all``, in torch alone.

Only the service process imports this module, to run the forward pass; worker processes
(decoding, building DICOM) never import torch. torchxrayvision itself is not imported
either: it pulls in torchvision, scikit-image and pandas, seconds and hundreds of MB for
a class definition. The layers below are those of ``xrv.models.DenseNet`` under the same
names, so the published file's state dict loads into them unchanged, and the forward is
torchxrayvision's (features, ReLU, global average pool, classifier, sigmoid, ``op_norm``),
op for op (``tests/test_cxr.py`` compares the scores with torchxrayvision's own model).
"""

from __future__ import annotations

import logging
import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import ModelError

logger = logging.getLogger(__name__)

GROWTH_RATE = 32
BLOCK_CONFIG = (6, 12, 24, 16)
INIT_FEATURES = 64
BN_SIZE = 4


class _DenseLayer(nn.Sequential):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(features))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module(
            "conv1", nn.Conv2d(features, BN_SIZE * GROWTH_RATE, kernel_size=1, bias=False)
        )
        self.add_module("norm2", nn.BatchNorm2d(BN_SIZE * GROWTH_RATE))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module(
            "conv2",
            nn.Conv2d(BN_SIZE * GROWTH_RATE, GROWTH_RATE, kernel_size=3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.cat([x, super().forward(x)], 1)  # type: ignore[no-untyped-call]


class _Transition(nn.Sequential):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(features, features // 2, kernel_size=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet121(nn.Module):
    """xrv's ``DenseNet`` with ``op_threshs``: 1-channel 224 x 224 input, one score per
    label, 0.5 at each label's operating threshold."""

    def __init__(self, classes: int, op_threshs: Sequence[float]) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(1, INIT_FEATURES, kernel_size=7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(INIT_FEATURES),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.features = nn.Sequential(layers)
        features = INIT_FEATURES
        for i, count in enumerate(BLOCK_CONFIG):
            block = nn.Sequential()
            for j in range(count):
                block.add_module(f"denselayer{j + 1}", _DenseLayer(features + j * GROWTH_RATE))
            self.features.add_module(f"denseblock{i + 1}", block)
            features += count * GROWTH_RATE
            if i != len(BLOCK_CONFIG) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(features))
                features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(features))
        self.classifier = nn.Linear(features, classes)
        self.op_threshs = torch.tensor(list(op_threshs), dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1)).view(features.size(0), -1)
        out = torch.sigmoid(self.classifier(out))
        return op_norm(out, self.op_threshs.to(out.device))


def op_norm(outputs: torch.Tensor, op_threshs: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's ``op_norm``: each threshold maps to 0.5, linearly on either side."""
    thresholds = op_threshs.expand(outputs.shape[0], -1)
    below = outputs < thresholds
    return torch.where(
        below,
        outputs / (thresholds * 2),
        1.0 - ((1.0 - outputs) / ((1 - thresholds) * 2)),
    )


class _Saved(nn.Module):
    """Stands for torchxrayvision's module classes while the published file is unpickled:
    only their parameters and buffers are kept (their state dict)."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torchxrayvision" or module.startswith("torchxrayvision."):
            return _Saved
        return super().find_class(module, name)


#: A pickle module for ``torch.load`` that resolves torchxrayvision's classes to
#: :class:`_Saved`, so that loading the published file needs no torchxrayvision import.
_PICKLE = types.ModuleType("service_cxr_pickle")
_PICKLE.Unpickler = _Unpickler  # type: ignore[attr-defined]
_PICKLE.load = lambda f, **kw: _Unpickler(f, **kw).load()  # type: ignore[attr-defined]


def load_network(path: Path, classes: int, op_threshs: Sequence[float]) -> DenseNet121:
    """The network from ``path``, as ``xrv.models.DenseNet(weights=...)`` loads it.

    The published file is a whole pickled ``xrv.models.DenseNet`` (``torch.save(model)``),
    not a state dict: torch's ``weights_only`` unpickler refuses its classes, so it is
    loaded with ``weights_only=False`` as torchxrayvision does. That runs pickle code, so
    only load a trusted file; pin its digest with ``models.cxr.sha256``. A bare state dict
    is accepted too. Labels and operating thresholds come from the caller (torchxrayvision's
    ``model_urls``), not the file, exactly as in torchxrayvision.
    """
    saved = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    if isinstance(saved, nn.Module):
        for module in saved.modules():  # xrv's patch for models pickled by old torch
            if not hasattr(module, "_non_persistent_buffers_set"):
                module._non_persistent_buffers_set = set()
        state = saved.state_dict()
    elif isinstance(saved, Mapping):
        state = dict(saved)
    else:
        raise ModelError(f"{path}: neither a pickled model nor a state dict")
    state.pop("op_threshs", None)  # xrv sets them from model_urls after loading, as here
    network = DenseNet121(classes, op_threshs)
    network.load_state_dict(state)
    return network.eval()


def pick_device(setting: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class Network:
    """The loaded network on its device: scores for batches of prepared rows."""

    def __init__(self, path: Path, classes: int, op_threshs: Sequence[float], device: str):
        self.device = pick_device(device)
        self.module = load_network(path, classes, op_threshs).to(self.device)
        self.runtime = f"torch {torch.__version__} {self.device}"

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """Scores (N, classes) for a batch (N, 1, 224, 224): ``model(x)`` of torchxrayvision."""
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
            out: np.ndarray = self.module(batch).float().cpu().numpy()
        return out


def load(
    path: Path, classes: int, op_threshs: Sequence[float], device: str, threads: int
) -> Network:
    """Load on one torch thread, then set ``threads`` (0: torch's default) for the forward.

    Loading on one thread leaves the OpenMP thread team to the thread that runs the forward
    (the service's engine thread): with a second team (the loading thread's) libgomp counts
    more threads than cores and stops spin-waiting between the forward's parallel regions,
    which made the forward 2.4x slower on 2 cores (``bench/pipeline.py``).
    """
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Network(path, classes, op_threshs, device)
    finally:
        torch.set_num_threads(threads)
