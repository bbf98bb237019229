"""The project's sample input (devtools.sample) and its development config."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from devtools.sample import PATIENT_NAME, build_sample, pydicom_file
from service.config import load_config
from service.uids import is_valid_uid
from tests.conftest import ROOT, dciodvfy, shared_file


def _image_rows(db_path: Path) -> dict[str, tuple[str, str, str]]:
    """SOP UID -> (series UID, study UID, patient name) by following referenceId links."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            """
            SELECT image.SOPInstanceUID, series.SeriesInstanceUID, study.StudyInstanceUID,
                   patient.PatientName
            FROM image
            JOIN series ON image.referenceId = series.id
            JOIN study ON series.referenceId = study.id
            JOIN patient ON study.referenceId = patient.id
            """
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _schema(db_path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db_path) as db:
        return sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall())


def _counts(db_path: Path) -> list[int]:
    with sqlite3.connect(db_path) as db:
        return [
            db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("patient", "study", "series", "image")
        ]


def test_sample_files_match_image_db(tmp_path: Path) -> None:
    paths = build_sample(tmp_path)
    assert {p.parent.parent.name for p in paths} == {"gateway_1", "gateway_2"}
    for gateway in ("gateway_1", "gateway_2"):
        files = [p for p in paths if p.parent.parent.name == gateway]
        assert len(files) >= 2
        assert len({p.parent for p in files}) == 1  # one study folder per gateway
        rows = _image_rows(tmp_path / gateway / "image.db")
        assert set(rows) == {p.name for p in files}
        for path in files:
            ds = dcmread(path)
            assert ds.preamble is not None and ds.file_meta.TransferSyntaxUID
            assert path.name == ds.SOPInstanceUID and is_valid_uid(path.name)
            assert path.parent.name == ds.StudyInstanceUID
            assert str(ds.PatientName) == PATIENT_NAME
            assert ds.pixel_array.size > 0
            assert rows[path.name] == (ds.SeriesInstanceUID, ds.StudyInstanceUID, PATIENT_NAME)
            assert dciodvfy(path) == []
    # fresh UIDs, not those of pydicom's own files
    names = {p.name for p in paths}
    assert len(names) == len(paths)
    originals = {
        str(dcmread(pydicom_file(n), stop_before_pixels=True)[k].value)
        for n in ("CT_small.dcm", "MR_small.dcm")
        for k in ("SOPInstanceUID", "StudyInstanceUID")
    }
    assert originals.isdisjoint(names | {p.parent.name for p in paths})


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    first = build_sample(tmp_path)
    digests = {p: hashlib.sha256(p.read_bytes()).digest() for p in first}
    counts = {g: _counts(tmp_path / g / "image.db") for g in ("gateway_1", "gateway_2")}
    result = subprocess.run(
        [sys.executable, "-m", "devtools.sample", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "image.db") == sorted(
        first
    )
    assert {p: hashlib.sha256(p.read_bytes()).digest() for p in first} == digests
    assert {g: _counts(tmp_path / g / "image.db") for g in counts} == counts


def test_schema_is_the_gateway_apps(tmp_path: Path) -> None:
    build_sample(tmp_path)
    real = shared_file("gateway-sample/INPUT/gateway_1/image.db")
    assert _schema(tmp_path / "gateway_1" / "image.db") == _schema(real)
    assert _schema(tmp_path / "gateway_2" / "image.db") == _schema(real)


def test_sample_config_loads() -> None:
    config = load_config(ROOT / "config" / "sample.toml", environ={})
    rules = config.gateway("1").rules
    assert [r.model for r in rules] == ["cxr-densenet121", "annotate"]
    assert set(rules[0].modality) == {"CR", "DX"}
    assert rules[1].modality == rules[1].body_part == rules[1].sop_class == ()
    assert config.defaults.stable_seconds == 2
    assert config.watch == "native"
    assert (config.input_dir, config.output_dir, config.state_dir) == (
        ROOT / "INPUT",
        ROOT / "OUTPUT",
        ROOT / "STATE",
    )
