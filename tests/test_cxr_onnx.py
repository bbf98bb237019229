"""The CXR network on ONNX Runtime: the export, its check against torch, and its record.

The checkpoint is the random DenseNet-121 of ``tests/test_cxr.py`` in the published file
format; the export and ONNX Runtime are the real ones.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.config import Config, CxrConfig
from service.errors import ModelError
from service.models import EXPORT_FOLDER, build_models, cxr_onnx
from service.models.cxr import CxrModel, sha256_file
from tests.test_cxr import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint with no export beside it."""
    return write_checkpoint(tmp_path_factory.mktemp("bare"), export=False)


def loaded(weights: Path, export_dir: Path | None, runtime: str = "auto") -> CxrModel:
    model = CxrModel(
        CxrConfig(weights=str(weights), device="cpu", runtime=runtime), export_dir=export_dir
    )
    assert model.wait_loaded(300)
    return model


def test_export_is_checked_against_torch_and_recorded(bare: Path, tmp_path: Path) -> None:
    path, record = cxr_onnx.export(bare, tmp_path)
    assert path == cxr_onnx.export_path(tmp_path, sha256_file(bare))
    assert record.weights_sha256 == sha256_file(bare)
    assert record.onnx_sha256 == sha256_file(path)
    assert record.onnxruntime == cxr_onnx.runtime_version()
    assert 0 < record.max_abs_diff <= cxr_onnx.TOLERANCE
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["max_abs_diff"] == record.max_abs_diff
    assert cxr_onnx.valid_export(tmp_path, record.weights_sha256) == (path, record)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.with_suffix(".json").name, path.name]


def test_an_export_outside_the_tolerance_is_refused_and_leaves_nothing(
    bare: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cxr_onnx, "TOLERANCE", 1e-12)
    with pytest.raises(ModelError, match="from torch's"):
        cxr_onnx.export(bare, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_service_exports_once_into_state_and_uses_it_after(bare: Path, tmp_path: Path) -> None:
    """No export beside the weights: the first load makes one in export_dir (a child process
    imports torch, not this one), the next load finds it and makes none."""
    first = loaded(bare, tmp_path / "models")
    assert first.runtime == f"onnxruntime {cxr_onnx.runtime_version()}"
    found = cxr_onnx.valid_export(tmp_path / "models", first.sha256)
    assert found is not None and not list(bare.parent.glob("*.onnx"))
    made = found[0].stat().st_mtime_ns
    second = loaded(bare, tmp_path / "models")
    assert second.runtime == first.runtime and found[0].stat().st_mtime_ns == made
    batch = np.zeros((2, 1, 224, 224), np.float32)
    np.testing.assert_array_equal(first.forward(batch), second.forward(batch))


def test_a_changed_export_or_one_checked_by_another_runtime_is_made_again(
    bare: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    path, record = cxr_onnx.export(bare, folder)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cxr_onnx.valid_export(folder, record.weights_sha256) is None
    assert loaded(bare, folder).runtime.startswith("onnxruntime")
    remade = cxr_onnx.valid_export(folder, record.weights_sha256)
    assert remade is not None and remade[1].onnx_sha256 == sha256_file(path)

    other = replace(record, onnxruntime="0.0.1")
    path.with_suffix(".json").write_text(json.dumps(other.__dict__))
    assert cxr_onnx.valid_export(folder, record.weights_sha256) is None
    assert cxr_onnx.valid_export(folder, "0" * 64) is None  # other weights


def test_a_failed_export_runs_torch_under_auto_and_is_not_ready_when_onnxruntime_is_asked(
    bare: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="service.models.cxr"):
        auto = loaded(bare, blocked)
    assert auto.ready().ok and auto.runtime.startswith("torch ")
    assert any("the forward runs on torch instead" in r.getMessage() for r in caplog.records)
    forced = loaded(bare, blocked, runtime="onnxruntime")
    verdict = forced.ready()
    assert not verdict.ok and "cannot export" in verdict.reason


def test_the_service_keeps_its_export_in_state(bare: Path, tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path / "STATE", cxr=CxrConfig(weights=str(bare)))
    model = build_models(config, ["cxr-densenet121"], load=False)["cxr-densenet121"]
    assert isinstance(model, CxrModel)
    assert model.export_dir == tmp_path / "STATE" / EXPORT_FOLDER


def test_models_fetch_leaves_a_checked_export_beside_present_weights(tmp_path: Path) -> None:
    weights = write_checkpoint(tmp_path / "weights", export=False)
    env = dict(os.environ, GATEWAY_CXR_WEIGHTS=str(weights), GATEWAY_CXR_DEVICE="cpu")
    env["GATEWAY_STATE_DIR"] = str(tmp_path / "STATE")
    done = subprocess.run(
        [sys.executable, "main.py", "models", "fetch"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"weights ready: {weights}"
    assert lines[1].startswith(f"ONNX export ready: {weights.parent}/densenet121-res224-all-")
    assert cxr_onnx.valid_export(weights.parent, sha256_file(weights)) is not None
