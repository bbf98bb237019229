"""Assembly on real DICOM files: listing, stability, inspection, duplicates, digests."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from devtools.sample import pydicom_file
from service.assembly import (
    INCOMPLETE_REASON,
    MAX_NESTING,
    Assembler,
    Stability,
    incomplete_reason,
    inputs_digest,
    inspect_file,
    snapshot,
    study_uid_from_folder,
)
from service.values import FileState, Instance, Rejected
from tests.conftest import shared_file
from tests.hostile import many_items, nested_sequences, splice

BIG = 2**40
_OPENED: list[str] = []
_HOOKED = False


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Paths opened by this process while the test runs (a real audit hook, PEP 578)."""
    global _HOOKED
    if not _HOOKED:  # audit hooks cannot be removed: install one, record only when asked
        sys.addaudithook(_audit)
        _HOOKED = True
    _OPENED.clear()
    _RECORDING.set()
    try:
        yield _OPENED
    finally:
        _RECORDING.clear()


_RECORDING = threading.Event()


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _RECORDING.is_set() and isinstance(args[0], str | Path):
        _OPENED.append(str(args[0]))


CT_NOISE = "series/ct-4-noise"
MR_PHANTOM = "series/mr-phantom-63"


def inspect(path: Path, max_file_bytes: int = BIG, max_pixels: int = BIG) -> object:
    return inspect_file(path, max_file_bytes=max_file_bytes, max_pixels=max_pixels)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def study_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# -- inspect_file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative",
    [
        "series/ct-4-noise/IM-0001-0001.dcm",
        "series/mr-phantom-63/5001001.dcm",
        "cxr/cr-mono1-chest-nometa",  # no preamble, no file meta
        "cxr/siim-cr-pa-jpeg.dcm",  # encapsulated
        "cxr/nema-rg1-pa-j2k.dcm",
    ],
)
def test_real_files_are_instances(relative: str) -> None:
    path = shared_file(relative)
    result = inspect(path)
    assert isinstance(result, Instance), result
    ds = dcmread(path, stop_before_pixels=True, force=True)
    assert result.sop_instance_uid == ds.SOPInstanceUID
    assert result.study_instance_uid == ds.StudyInstanceUID
    assert result.rows == ds.Rows and result.columns == ds.Columns
    assert result.sha256 == sha(path)
    assert result.size == path.stat().st_size


@pytest.mark.parametrize("name", ["image_dfl.dcm", "MR_small_bigendian.dcm", "rtplan.dcm"])
def test_other_encodings_are_instances(name: str) -> None:
    assert isinstance(inspect(pydicom_file(name)), Instance)


def test_file_written_in_chunks_is_incomplete_until_whole(tmp_path: Path) -> None:
    data = shared_file("series/ct-4-noise/IM-0001-0001.dcm").read_bytes()
    target = tmp_path / "1.2.3"
    with open(target, "wb") as fh:
        for end in (100, 1000, len(data) // 2, len(data) - 1):
            fh.seek(0)
            fh.write(data[:end])
            fh.flush()
            assert inspect(target) is None, f"{end} of {len(data)} bytes"
        fh.write(data[len(data) - 1 :])
    assert isinstance(inspect(target), Instance)


@pytest.mark.parametrize("name", ["cxr/siim-cr-pa-jpeg.dcm", "cxr/cr-mono1-chest-nometa"])
def test_truncated_copies_are_incomplete_with_reason(tmp_path: Path, name: str) -> None:
    data = shared_file(name).read_bytes()
    target = tmp_path / "cut"
    target.write_bytes(data[: len(data) - 7])
    assert inspect(target) is None
    reason = incomplete_reason(target)
    assert reason.startswith(INCOMPLETE_REASON) and "file ends" in reason


def test_truncated_before_pixel_data_is_incomplete(tmp_path: Path) -> None:
    path = shared_file("series/ct-4-noise/IM-0001-0001.dcm")
    data = path.read_bytes()
    pixel_at = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) tag, little endian
    target = tmp_path / "cut"
    target.write_bytes(data[:pixel_at])  # ends exactly at an element boundary
    assert inspect(target) is None
    assert "before Pixel Data" in incomplete_reason(target)


def test_junk_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "junk"
    target.write_bytes(b"PK\x03\x04 this is a zip file, honest" + os.urandom(4000))
    result = inspect(target)
    assert isinstance(result, Rejected) and "not a DICOM file" in result.reason


def test_zero_byte_file_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.touch()
    result = inspect(target)
    assert isinstance(result, Rejected) and "empty" in result.reason


def test_a_file_name_that_is_not_utf8_is_rejected_with_its_bytes_escaped(tmp_path: Path) -> None:
    source = shared_file("series/ct-4-noise/IM-0001-0001.dcm")
    odd = os.fsencode(tmp_path) + b"/copy-\xff.dcm"
    shutil.copyfile(source, odd)
    result = inspect(Path(os.fsdecode(odd)))
    assert isinstance(result, Rejected)
    assert result.reason == "file name is not valid UTF-8: copy-\\xff.dcm"


def test_over_size_budget_rejected_without_opening(tmp_path: Path, opened: list[str]) -> None:
    target = tmp_path / "big"
    shutil.copyfile(shared_file("series/ct-4-noise/IM-0001-0001.dcm"), target)
    opened.clear()
    result = inspect(target, max_file_bytes=1000)
    assert isinstance(result, Rejected) and "exceeds the limit of 1000 bytes" in result.reason
    assert str(target) not in opened
    inspect(target)
    assert str(target) in opened  # the hook does see our opens


def test_over_size_budget_rejected(tmp_path: Path) -> None:
    path = shared_file("series/ct-4-noise/IM-0001-0001.dcm")
    result = inspect(path, max_file_bytes=path.stat().st_size - 1)
    assert isinstance(result, Rejected) and "exceeds the limit" in result.reason
    assert isinstance(inspect(path, max_file_bytes=path.stat().st_size), Instance)


def test_over_pixel_budget_rejected() -> None:
    path = shared_file("series/ct-4-noise/IM-0001-0001.dcm")  # 512 x 512
    result = inspect(path, max_pixels=512 * 512 - 1)
    assert isinstance(result, Rejected) and "pixels" in result.reason
    assert isinstance(inspect(path, max_pixels=512 * 512), Instance)


@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
def test_sequences_nested_1000_deep_are_rejected_at_intake(tmp_path: Path, undefined: bool) -> None:
    """Every sequence counts towards the depth bound, whatever its length encoding: a
    33 KB file nesting defined-length sequences 1000 deep used to pass and send a
    worker into endless recursion."""
    source = shared_file("series/ct-4-noise/IM-0001-0001.dcm")
    deep = splice(source, tmp_path / "deep.dcm", nested_sequences(1000, undefined))
    result = inspect(deep)
    assert isinstance(result, Rejected)
    assert result.reason == f"malformed DICOM: sequences nested deeper than {MAX_NESTING} levels"
    ok = splice(source, tmp_path / "ok.dcm", nested_sequences(MAX_NESTING, undefined))
    assert isinstance(inspect(ok), Instance)


def test_element_count_over_the_limit_is_rejected(tmp_path: Path) -> None:
    source = shared_file("series/ct-4-noise/IM-0001-0001.dcm")
    many = splice(source, tmp_path / "many.dcm", many_items(5000))  # 10 000 elements in it
    result = inspect_file(many, max_file_bytes=BIG, max_pixels=BIG, max_elements=10_000)
    assert isinstance(result, Rejected)
    assert result.reason == "malformed DICOM: more than 10000 data elements"
    fewer = inspect_file(many, max_file_bytes=BIG, max_pixels=BIG, max_elements=11_000)
    assert isinstance(fewer, Instance)


def test_deflated_data_set_inflating_past_the_size_budget_is_rejected(tmp_path: Path) -> None:
    path = pydicom_file("image_dfl.dcm")
    size = path.stat().st_size
    result = inspect(path, max_file_bytes=size + 1000)  # the file fits, inflated it does not
    assert isinstance(result, Rejected)
    assert "the deflated data set inflates to more than" in result.reason
    assert isinstance(inspect(path, max_file_bytes=300_000), Instance)  # 262 144 pixel bytes


def _rewrite(source: Path, target: Path, **changes: str) -> None:
    ds = dcmread(source)
    for keyword, value in changes.items():
        if value:
            setattr(ds, keyword, value)
        else:
            delattr(ds, keyword)
    ds.save_as(target)


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"SOPInstanceUID": ""}, "missing SOPInstanceUID"),
        ({"SeriesInstanceUID": ""}, "missing SeriesInstanceUID"),
        ({"StudyInstanceUID": "1.2." + "3" * 70}, "invalid StudyInstanceUID"),
        ({"SOPInstanceUID": "../../etc/passwd"}, "invalid SOPInstanceUID"),
        ({"SOPInstanceUID": "1.2.3\x00.4"}, "invalid SOPInstanceUID"),
    ],
)
def test_missing_or_invalid_uids_rejected(
    tmp_path: Path, changes: dict[str, str], expected: str
) -> None:
    target = tmp_path / "bad.dcm"
    _rewrite(pydicom_file("CT_small.dcm"), target, **changes)
    result = inspect(target)
    assert isinstance(result, Rejected) and expected in result.reason


def test_short_native_pixel_data_rejected(tmp_path: Path) -> None:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "short.dcm")
    result = inspect(tmp_path / "short.dcm")
    assert isinstance(result, Rejected) and "requires" in result.reason


# -- snapshot and stability ----------------------------------------------------------------


def test_snapshot_recurses_skips_hidden_and_outside_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "INPUT"
    study = root / "gateway_1" / "1.2.3"
    (study / "a" / "b").mkdir(parents=True)
    (study / "top").write_bytes(b"1")
    (study / "a" / "b" / "deep").write_bytes(b"22")
    (study / ".partial").write_bytes(b"333")
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    (study / "link-out").symlink_to(outside)
    (study / "link-in").symlink_to(study / "top")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "x").write_bytes(b"x")
    (study / "dirlink").symlink_to(tmp_path / "outdir", target_is_directory=True)
    os.mkfifo(study / "fifo")
    snap = snapshot(study, root)
    assert set(snap) == {"top", "a/b/deep", "link-in"}
    assert snap["a/b/deep"] == FileState(2, (study / "a" / "b" / "deep").stat().st_mtime_ns)
    # a folder beyond max_depth is listed itself (rejected with the reason later), not entered
    assert set(snapshot(study, root, max_depth=1)) == {"top", "link-in", "a/b"}


def test_stability_uses_only_the_monotonic_clock(tmp_path: Path) -> None:
    root = tmp_path / "INPUT"
    study = root / "gateway_1" / "1.2.3"
    study.mkdir(parents=True)
    future, past = study / "future", study / "past"
    future.write_bytes(b"f")
    past.write_bytes(b"p")
    wall = future.stat().st_mtime
    os.utime(future, (wall + 3600, wall + 3600))
    os.utime(past, (wall - 3600, wall - 3600))
    stability = Stability()
    key = ("1", "1.2.3")
    assert stability.observe(key, snapshot(study, root), now=100.0) == 0.0
    assert stability.observe(key, snapshot(study, root), now=105.0) == 5.0
    assert stability.observe(key, snapshot(study, root), now=130.0) == 30.0
    os.utime(past, (wall - 7200, wall - 7200))  # a change, even back in time, restarts
    assert stability.observe(key, snapshot(study, root), now=131.0) == 0.0
    assert stability.observe(key, snapshot(study, root), now=140.0) == 9.0
    stability.forget(key)
    assert stability.observe(key, snapshot(study, root), now=150.0) == 0.0


# -- assembling ----------------------------------------------------------------------------


def _copy_series(source: Path, study: Path, count: int) -> list[Path]:
    study.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.is_file())[:count]
    for path in files:
        shutil.copyfile(path, study / path.stem)  # no extension, like the gateway
    return files


def test_assemble_study_and_caches_unchanged_files(tmp_path: Path, opened: list[str]) -> None:
    source = shared_file(MR_PHANTOM)
    files = _copy_series(source, tmp_path / "tmp", 1)
    study_uid = study_of(files[0])
    root = tmp_path / "INPUT"
    folder = root / "gateway_1" / study_uid
    sources = _copy_series(source, folder / "series1", 10)
    before = {p.name: sha(p) for p in sources}
    assembler = Assembler()
    study = assembler.assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    assert len(study.instances) == 10 and not study.rejected and not study.incomplete
    # Cached: unchanged files are not opened again; a touched one is.
    touched = study.instances[0].path
    os.utime(touched, ns=(1, touched.stat().st_mtime_ns + 1))
    opened.clear()
    again = assembler.assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    assert [p for p in opened if p.startswith(str(folder))] == [str(touched)]
    assert again.sop_uids == study.sop_uids
    assert {p.name: sha(p) for p in sources} == before  # sources untouched
    assert {i.path.name: i.sha256 for i in again.instances} == {
        p.stem: h for p, h in zip(sources, before.values(), strict=True)
    }


_BUDGET = {"max_file_bytes": BIG, "max_pixels": BIG}


def test_assemble_rejects_foreign_study_and_handles_duplicates(tmp_path: Path) -> None:
    ct = sorted(shared_file(CT_NOISE).iterdir())
    study_uid = study_of(ct[0])
    root = tmp_path / "INPUT"
    folder = root / "gateway_1" / study_uid
    folder.mkdir(parents=True)
    for i, path in enumerate(ct):
        shutil.copyfile(path, folder / f"ct{i}")
    shutil.copyfile(ct[0], folder / "zz-same-as-ct0")  # identical duplicate
    # Same SOPInstanceUID as ct1, different bytes.
    ds = dcmread(ct[1])
    ds.SeriesDescription = "edited"
    ds.save_as(folder / "ct1-edited")
    shutil.copyfile(pydicom_file("CT_small.dcm"), folder / "foreign")
    hashes = {p.name: sha(p) for p in folder.iterdir()}

    study = Assembler().assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    reasons = {r.path.name: r for r in study.rejected}
    assert {i.path.name for i in study.instances} == {"ct0", "ct2", "ct3"}
    assert reasons["zz-same-as-ct0"].reason == "duplicate of ct0, identical bytes"
    assert reasons["zz-same-as-ct0"].quarantine is False
    assert "conflicting content" in reasons["ct1"].reason
    assert "conflicting content" in reasons["ct1-edited"].reason
    assert "differs from the study folder name" in reasons["foreign"].reason
    assert {p.name: sha(p) for p in folder.iterdir()} == hashes  # inputs untouched


@pytest.mark.parametrize(
    ("first", "second", "refused"),
    [
        ({}, {"PatientID": "OTHER-4711"}, "instances of 2 different patients (PatientID differ)"),
        (
            {"IssuerOfPatientID": "HOSP-A"},
            {"IssuerOfPatientID": "HOSP-B"},
            "instances of 2 different patients (IssuerOfPatientID differ)",
        ),
        ({"IssuerOfPatientID": "HOSP-A"}, {}, ""),  # compared only where present
    ],
    ids=["patient-id", "issuer", "issuer-in-one-only"],
)
def test_a_study_holding_two_patients_is_refused_without_naming_them(
    tmp_path: Path, first: dict[str, str], second: dict[str, str], refused: str
) -> None:
    ct = sorted(shared_file(CT_NOISE).iterdir())[:3]
    study_uid = study_of(ct[0])
    root = tmp_path / "INPUT"
    folder = root / "gateway_1" / study_uid
    folder.mkdir(parents=True)
    shutil.copyfile(ct[2], folder / "ct2")
    _rewrite(ct[0], folder / "ct0", **first)
    _rewrite(ct[1], folder / "ct1", **second)
    study = Assembler().assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    assert len(study.instances) == 3 and not study.rejected
    assert study.refused == (f"{refused} in one study: refused" if refused else "")
    identifiers = ("OTHER-4711", "HOSP-A", "HOSP-B", "dicom2nifti")
    assert not any(value in repr(study) for value in identifiers)


def test_assemble_lists_incomplete_files(tmp_path: Path) -> None:
    ct = sorted(shared_file(CT_NOISE).iterdir())
    study_uid = study_of(ct[0])
    root = tmp_path / "INPUT"
    folder = root / "gateway_1" / study_uid
    folder.mkdir(parents=True)
    shutil.copyfile(ct[0], folder / "whole")
    (folder / "half").write_bytes(ct[1].read_bytes()[:50_000])
    assembler = Assembler()
    study = assembler.assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    assert study.incomplete == [folder / "half"] and len(study.instances) == 1
    (folder / "half").write_bytes(ct[1].read_bytes())  # copy finished: re-inspected
    study = assembler.assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    assert not study.incomplete and len(study.instances) == 2


def test_inputs_digest_ignores_names_and_order(tmp_path: Path) -> None:
    ct = sorted(shared_file(CT_NOISE).iterdir())
    study_uid = study_of(ct[0])
    root = tmp_path / "INPUT"
    folder = root / "gateway_1" / study_uid
    folder.mkdir(parents=True)
    for i, path in enumerate(ct):
        shutil.copyfile(path, folder / f"f{i}")
    first = Assembler().assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    (folder / "sub").mkdir()
    for i in range(len(ct)):
        os.rename(folder / f"f{i}", folder / "sub" / f"renamed{len(ct) - i}")
    second = Assembler().assemble("1", study_uid, folder, snapshot(folder, root), **_BUDGET)
    assert inputs_digest(first.instances) == inputs_digest(reversed(second.instances))
    assert inputs_digest(first.instances) != inputs_digest(first.instances[1:])


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "x\x00y", "tab\tname", "9" * 65])
def test_hostile_folder_names_refused(name: str) -> None:
    assert study_uid_from_folder(name) is None


def test_uid_folder_name_accepted() -> None:
    assert study_uid_from_folder("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
