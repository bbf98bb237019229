"""``python main.py run DICOM_IN DICOM_OUT [SERIES_UID] [--model NAME]``: the one-shot
container contract goes through the service's stages (assembly with its duplicate rules,
routing, the pipeline's write and conformance gate) on real files."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from service.cli import main
from service.oneshot import QUARANTINE_NAME
from tests.conftest import dciodvfy, shared_file
from tests.helpers import copy_series, run_cli, tree_digest, write_config
from tests.hostile import many_items, splice
from tests.test_cxr import write_checkpoint

ANNOTATE = '[{ model = "annotate" }]'


def ct_files(limit: int | None = None) -> list[Path]:
    return sorted(shared_file("series/ct-4-noise").iterdir())[:limit]


def results(dicom_out: Path) -> list[Path]:
    """What a consumer of DICOM_OUT takes as results: the files directly in it."""
    return sorted(p for p in dicom_out.iterdir() if p.is_file()) if dicom_out.exists() else []


def hidden(dicom_out: Path) -> list[str]:
    return sorted(p.name for p in dicom_out.iterdir() if p.name.startswith("."))


def summary(text: str) -> str:
    """The printed line with the counts (stdout)."""
    (line,) = [ln for ln in text.splitlines() if "instance(s) used" in ln]
    return line


def new_dciodvfy_errors(output: Path, source: Path) -> list[str]:
    """dciodvfy's errors on ``output`` that it does not report on ``source`` too."""
    known = set(dciodvfy(source))
    return [line for line in dciodvfy(output) if line not in known]


def cli(*args: str) -> tuple[int, str, str]:
    """The real CLI as a process: exit code, stdout, stderr."""
    proc = run_cli(*args)
    return proc.returncode, proc.stdout, proc.stderr


def test_two_identical_copies_are_one_instance_via_the_cli_process(tmp_path: Path) -> None:
    config = write_config(tmp_path, rules=ANNOTATE)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    (dicom_in / "copy").mkdir(parents=True)
    source = ct_files(1)[0]
    shutil.copyfile(source, dicom_in / "a")
    shutil.copyfile(source, dicom_in / "copy" / "b.dcm")
    before = tree_digest(dicom_in)
    code, out, err = cli("--config", str(config), "run", str(dicom_in), str(dicom_out))
    assert code == 0, err
    (written,) = results(dicom_out)
    assert summary(out) == (
        "annotate 1.0.0: 1 instance(s) used, 1 duplicate(s) ignored, 0 file(s) rejected, "
        f"1 object(s) written to {dicom_out}"
    )
    assert hidden(dicom_out) == []  # no staging folder, no quarantine left behind
    ds = pydicom.dcmread(written)
    src = pydicom.dcmread(source)
    assert written.name == f"{ds.SOPInstanceUID}.dcm"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert new_dciodvfy_errors(written, source) == []
    assert tree_digest(dicom_in) == before


def test_two_identical_cxr_copies_give_one_measurement_group(tmp_path: Path) -> None:
    """The default rules route a chest radiograph to the CXR model: one image in, so the SR
    has one measurement group and there is one summary image, however many copies."""
    weights = write_checkpoint(tmp_path / "weights")
    config = write_config(
        tmp_path,
        extra=f'[models.cxr]\nweights = "{weights}"\ndevice = "cpu"\n',
        rules='[{ model = "cxr-densenet121", modality = ["CR", "DX"] }]',
    )
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    dicom_in.mkdir()
    source = shared_file("cxr/siim-cr-pa-jpeg.dcm")
    shutil.copyfile(source, dicom_in / "image")
    shutil.copyfile(source, dicom_in / "image-again")
    code, out, err = cli("--config", str(config), "run", str(dicom_in), str(dicom_out))
    assert code == 0, err
    written = [pydicom.dcmread(p) for p in results(dicom_out)]
    (sr,) = [ds for ds in written if ds.Modality == "SR"]
    groups = next(
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    ).ContentSequence
    assert len(groups) == 1
    (summary_image,) = [ds for ds in written if ds.Modality != "SR"]
    assert "1 instance(s) used, 1 duplicate(s) ignored, 0 file(s) rejected, 2 object(s)" in (
        summary(out)
    )
    src_uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    assert summary_image.SourceImageSequence[0].ReferencedSOPInstanceUID == src_uid
    for path in results(dicom_out):
        assert new_dciodvfy_errors(path, source) == [], path.name


def conflicting_copy(source: Path, target: Path) -> str:
    """``source`` saved at ``target`` with the same SOP Instance UID and other content."""
    ds = pydicom.dcmread(source)
    ds.InstanceNumber = 999
    ds.save_as(target)
    return str(ds.SOPInstanceUID)


def test_a_conflicting_copy_is_rejected_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, rules=ANNOTATE)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    dicom_in.mkdir()
    first, second = ct_files(2)
    shutil.copyfile(first, dicom_in / "first")
    shutil.copyfile(second, dicom_in / "second")
    conflicted = conflicting_copy(second, dicom_in / "zz-second-edited")
    data = first.read_bytes()
    (dicom_in / "truncated").write_bytes(data[: len(data) // 2])  # a copy of the first, cut short
    code = main(["--config", str(config), "run", str(dicom_in), str(dicom_out)])
    out, err = capsys.readouterr()
    assert code == 0, err
    (written,) = results(dicom_out)
    src_uid = pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID
    assert pydicom.dcmread(written).SourceImageSequence[0].ReferencedSOPInstanceUID == src_uid
    assert summary(out) == (
        "annotate 1.0.0: 1 instance(s) used, 0 duplicate(s) ignored, 3 file(s) rejected, "
        f"1 object(s) written to {dicom_out}"
    )
    # the reasons, naming both conflicting files
    assert re.search(
        rf"file second not used: conflicting content for SOPInstanceUID {conflicted}: "
        r"files second, zz-second-edited differ",
        err,
    )
    assert "file zz-second-edited not used: conflicting content" in err
    assert "file truncated not used: file is incomplete (truncated) at the start of the run" in err

    # only the conflicting copies: no usable instance, exit 1 and nothing written
    only = tmp_path / "only"
    only.mkdir()
    shutil.copyfile(second, only / "second")
    conflicting_copy(second, only / "second-edited")
    code = main(["--config", str(config), "run", str(only), str(tmp_path / "out2")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: no usable input: all 2 file(s) of study" in err
    assert "conflicting content for SOPInstanceUID" in err
    assert not (tmp_path / "out2").exists()


def test_an_output_failing_the_gate_is_quarantined_and_exits_1(tmp_path: Path) -> None:
    """A CT whose Type 1 Modality is empty: its derived copy keeps it and fails the gate."""
    config = write_config(tmp_path, rules=ANNOTATE)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    dicom_in.mkdir()
    src = pydicom.dcmread(ct_files(1)[0])
    src.Modality = ""
    src.save_as(dicom_in / "ct")
    before = tree_digest(dicom_in)
    code, out, err = cli("--config", str(config), "run", str(dicom_in), str(dicom_out))
    assert code == 1, err
    quarantine = dicom_out / QUARANTINE_NAME / "gateway_run"
    (moved,) = sorted(quarantine.iterdir())
    assert "error: conformance gate: 1 problem(s) in 1 of 1 object(s)" in err
    assert "Modality is empty (Type 1" in err
    assert f"moved to {quarantine}" in err
    assert summary(out).endswith(
        f"0 object(s) written to {dicom_out}, 1 object(s) quarantined in {quarantine}"
    )
    assert results(dicom_out) == []  # nothing left as a result
    assert hidden(dicom_out) == [QUARANTINE_NAME]  # and no staging folder
    assert pydicom.dcmread(moved).SourceImageSequence[0].ReferencedSOPInstanceUID == (
        src.SOPInstanceUID
    )
    assert tree_digest(dicom_in) == before


def test_existing_results_are_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, rules=ANNOTATE)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    copy_series(shared_file("series/ct-4-noise"), dicom_in, limit=2)
    dicom_out.mkdir()
    (dicom_out / "unrelated.txt").write_text("kept")
    args = ["--config", str(config), "run", str(dicom_in), str(dicom_out), "--model", "annotate"]
    assert main(args) == 0
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in results(dicom_out)}
    assert len(first) == 3  # 2 results + the unrelated file
    capsys.readouterr()
    # the same inputs again: the same output UIDs, hence the same names
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "already holds 2 of this run's 2 file(s)" in err
    assert "0 object(s) written" in summary(out)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in results(dicom_out)} == first
    assert hidden(dicom_out) == []


def test_series_uid_chooses_its_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=ANNOTATE)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    _, ct = copy_series(shared_file("series/ct-4-noise"), dicom_in, limit=1)
    mr_study, mr = copy_series(shared_file("series/mr-phantom-63"), dicom_in, limit=2)
    series_uid = str(pydicom.dcmread(mr[0], stop_before_pixels=True).SeriesInstanceUID)
    assert main(["--config", str(config), "run", str(dicom_in), str(dicom_out)]) == 2
    assert "holds 2 studies; name the SERIES_UID" in capsys.readouterr().err
    assert not dicom_out.exists()
    assert main(["--config", str(config), "run", str(dicom_in), str(dicom_out), series_uid]) == 0
    out, _ = capsys.readouterr()
    assert summary(out) == (
        "annotate 1.0.0: 2 instance(s) used, 0 duplicate(s) ignored, 0 file(s) rejected, "
        f"2 object(s) written to {dicom_out}, 1 instance(s) of other studies not used"
    )
    written: list[Dataset] = [pydicom.dcmread(p) for p in results(dicom_out)]
    assert {ds.StudyInstanceUID for ds in written} == {mr_study}
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in written} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr
    }
    assert os.path.exists(ct[0])


def test_file_budget_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file over ``max_file_bytes`` is rejected with the reason before it is read; an
    output folder inside the input folder is bad usage."""
    config = write_config(tmp_path, rules=ANNOTATE, max_file_bytes=300_000)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    _, mr = copy_series(shared_file("series/mr-phantom-63"), dicom_in, limit=2)
    _, (ct,) = copy_series(shared_file("series/ct-4-noise"), dicom_in, limit=1)
    assert all(p.stat().st_size < 300_000 for p in mr) and ct.stat().st_size > 300_000
    assert main(["--config", str(config), "run", str(dicom_in), str(dicom_out)]) == 0
    out, err = capsys.readouterr()
    assert len(results(dicom_out)) == 2
    assert summary(out) == (
        "annotate 1.0.0: 2 instance(s) used, 0 duplicate(s) ignored, 1 file(s) rejected, "
        f"2 object(s) written to {dicom_out}"
    )
    assert "exceeds the limit of 300000 bytes" in err
    inside = dicom_in / "results"
    assert main(["--config", str(config), "run", str(dicom_in), str(inside)]) == 2
    assert "is inside" in capsys.readouterr().err
    assert not inside.exists()


def test_a_study_of_two_patients_exits_1_with_the_reason_and_writes_nothing(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, rules=ANNOTATE)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    _, files = copy_series(shared_file("series/ct-4-noise"), dicom_in, limit=2)
    other = pydicom.dcmread(files[1])
    other.PatientID = "OTHER-4711"
    other.IssuerOfPatientID = "HOSP-B"
    other.save_as(files[1])
    code, out, err = cli("--config", str(config), "run", str(dicom_in), str(dicom_out))
    assert code == 1, out + err
    assert (
        "error: instances of 2 different patients (PatientID differ) in one study: refused" in err
    )
    assert results(dicom_out) == []
    assert "OTHER-4711" not in out + err and "dicom2nifti" not in out + err


def test_a_run_past_its_deadline_exits_1_within_a_bound(tmp_path: Path) -> None:
    """A file that passes intake but keeps annotate busy for a minute: the guarded worker
    is killed at ``run_timeout_seconds`` and ``run`` exits 1 with the reason."""
    config = write_config(tmp_path, rules=ANNOTATE, run_timeout_seconds=3)
    dicom_in, dicom_out = tmp_path / "in", tmp_path / "out"
    _, (_ct, other) = copy_series(shared_file("series/ct-4-noise"), dicom_in, limit=2)
    splice(other, dicom_in / "many", many_items(400_000))
    os.remove(other)
    t0 = time.monotonic()
    code, out, err = cli("--config", str(config), "run", str(dicom_in), str(dicom_out))
    assert code == 1, out + err
    assert "error: run failed: run exceeded run_timeout_seconds=3" in err
    assert time.monotonic() - t0 < 50  # annotate alone takes about a minute on this file
    assert results(dicom_out) == []


def test_an_unwritable_dicom_out_fails_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, rules=ANNOTATE)
    dicom_in = tmp_path / "in"
    copy_series(shared_file("series/ct-4-noise"), dicom_in, limit=1)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    args = ["--config", str(config), "run", str(dicom_in)]
    assert main([*args, str(blocked)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main([*args, str(blocked / "out")]) == 1
    out, err = capsys.readouterr()
    assert f"error: cannot write into {blocked / 'out'}" in err
    assert "0 object(s) written" in summary(out)
    assert blocked.read_text() == "not a folder"
