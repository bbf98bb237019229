"""The chest X-ray model's DICOM results: TID 1500 SR and summary Secondary Capture."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from service.config import CxrConfig
from service.models import cxr_outputs
from service.models.base import ModelResult, RunContext
from service.models.cxr import CxrModel, load_radiograph
from service.models.cxr_outputs import DISCLAIMER, FINDING_CODES, LOCAL_SCHEME, table_rows
from service.uids import UidFactory
from service.values import Study
from service.writers import encode_dataset, write_dataset
from tests.conftest import dciodvfy, shared_file
from tests.test_cxr import ROOT, instance, study_of, write_checkpoint

SOURCES = ("siim-cr-pa-jpeg.dcm", "nema-rg1-pa-j2k.dcm")


@dataclass
class Run:
    model: CxrModel
    sources: list[Dataset]
    result: ModelResult
    files: list[Path]
    study: Study
    ctx: RunContext


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Two real radiographs made one study (copies), run once, results written to disk."""
    folder = tmp_path_factory.mktemp("study")
    study_uid = UidFactory(ROOT, "test").uid("study")
    sources: list[Dataset] = []
    for name in SOURCES:
        ds = pydicom.dcmread(shared_file(f"cxr/{name}"))
        ds.StudyInstanceUID = study_uid
        ds.save_as(folder / name)
        sources.append(ds)
    model = CxrModel(CxrConfig(weights=str(write_checkpoint(folder / "weights")), device="cpu"))
    study = study_of(*(folder / name for name in SOURCES))
    ctx = RunContext(UidFactory(ROOT, "1", study_uid, "1"), run_id=1)
    result = model.run(study, ctx)
    out = tmp_path_factory.mktemp("out")
    files = []
    for output in result.datasets:
        files.append(out / f"{output.SOPInstanceUID}.dcm")
        write_dataset(output, files[-1])
    return Run(model, sources, result, files, study, ctx)


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def test_outputs_round_trip_and_pass_dciodvfy(run: Run) -> None:
    assert len(run.files) == 1 + len(SOURCES)
    for path in run.files:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == run.sources[0].StudyInstanceUID
        assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in run.sources}
        assert dciodvfy(path) == [], path.name


def test_sr_is_tid1500_with_a_group_per_image(run: Run) -> None:
    sr = pydicom.dcmread(run.files[0])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {
        inst.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert evidence == {s.SOPInstanceUID for s in run.sources}
    groups = next(
        item
        for item in sr.ContentSequence
        if concept(item) == ("DCM", "126010")  # Imaging Measurements
    ).ContentSequence
    assert len(groups) == len(SOURCES)
    scores = run.result.findings["images"]
    for group, source in zip(groups, run.sources, strict=True):
        items = list(content_items(group))
        refs = [i for i in items if concept(i) == ("DCM", "121112")]  # Source of Measurement
        assert refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        numbers = {
            concept(i): float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM"
        }
        codes = {
            concept(i): str(i.ConceptCodeSequence[0].CodeValue)
            for i in items
            if i.ValueType == "CODE"
            and concept(i)[0] in ("SCT", LOCAL_SCHEME)
            and concept(i) != ("SCT", "121071")
        }
        expected = scores[source.SOPInstanceUID]
        assert len(expected) == 18
        for finding, score in expected.items():
            key = (FINDING_CODES[finding].scheme_designator, FINDING_CODES[finding].value)
            assert numbers[key] == pytest.approx(score, abs=1e-6)
            assert codes[key] == ("52101004" if score >= 0.5 else "272519000")
    assert ("SCT", "36118008") in numbers and ("SCT", "60046008") in numbers


def test_sr_carries_algorithm_device_and_weights_digest(run: Run) -> None:
    sr = pydicom.dcmread(run.files[0])
    texts = [str(i.get("TextValue", "")) for i in content_items(sr)]
    assert f"weights sha256 {run.model.sha256}" in texts
    assert run.model.version in texts and "cxr-densenet121" in texts
    uids = [str(i.get("UID", "")) for i in content_items(sr) if i.ValueType == "UIDREF"]
    assert any(uid.startswith(ROOT) for uid in uids)  # Device Observer UID
    scheme = sr.CodingSchemeIdentificationSequence[0]
    assert scheme.CodingSchemeDesignator == LOCAL_SCHEME


def test_summary_image_references_its_source(run: Run) -> None:
    for path, source in zip(run.files[1:], run.sources, strict=True):
        sc = pydicom.dcmread(path)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.Modality == "OT"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        assert sc.PhotometricInterpretation == "MONOCHROME2" and sc.BitsAllocated == 8
        assert sc.BurnedInAnnotation == "YES"
        assert "not for diagnostic use" in sc.DerivationDescription
        assert sc.pixel_array.shape[1] == 1024


def test_summary_text_is_in_a_band_below_the_untouched_radiograph(run: Run) -> None:
    """The radiograph's pixels are the display image exactly; the table is in a band added
    below it, naming findings as the SR does, with the disclaimer."""
    for path, name in zip(run.files[1:], SOURCES, strict=True):
        sc = pydicom.dcmread(path)
        plain = load_radiograph(instance(shared_file(f"cxr/{name}"))).display
        rows = plain.shape[0]
        assert sc.pixel_array.shape[0] > rows
        np.testing.assert_array_equal(sc.pixel_array[:rows], plain)
        band = sc.pixel_array[rows:]
        assert (band == 0).mean() > 0.5 and (band == 255).any()  # white text on black
    scores = run.result.findings["images"][run.sources[0].SOPInstanceUID]
    texts = [text for row in table_rows(run.model, scores) for text in row]
    assert DISCLAIMER == "AI result - not for diagnostic use" and DISCLAIMER in texts
    top = max(scores, key=lambda finding: scores[finding])
    assert FINDING_CODES[top].meaning in texts
    sr_names = {str(i.ConceptNameCodeSequence[0].CodeMeaning) for i in sr_numbers(run)}
    findings = [t for t in texts[texts.index("score") + 1 :: 2]]
    assert findings and set(findings) <= sr_names


def sr_numbers(run: Run) -> list[Dataset]:
    return [i for i in content_items(pydicom.dcmread(run.files[0])) if i.ValueType == "NUM"]


def test_summary_image_is_a_chest_without_empty_laterality(run: Run) -> None:
    """BodyPartExamined CHEST; Laterality (Type 2C, paired body parts, PS3.3 C.7.3.1) is
    absent: dciodvfy has no warning about either."""
    for path in run.files[1:]:
        sc = pydicom.dcmread(path)
        assert sc.BodyPartExamined == "CHEST" and "Laterality" not in sc
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert "Laterality" not in report.stdout + report.stderr
        assert "BodyPartExamined" not in report.stdout + report.stderr


def test_output_uids_are_stable_for_a_rerun(run: Run) -> None:
    """A run repeated (e.g. after a crash) rewrites the same objects under the same UIDs."""
    first = [str(ds.SOPInstanceUID) for ds in run.result.datasets]
    again = [str(ds.SOPInstanceUID) for ds in run.model.run(run.study, run.ctx).datasets]
    assert again == first and len(set(first)) == len(first)
    assert all(uid.startswith(ROOT) for uid in first)


def test_summary_image_stays_lossy_like_its_source(run: Run) -> None:
    """PS3.3 C.7.6.1.1.5: an image derived from lossy pixels is "01", with the method and
    ratio of each step (JPEG Baseline; lossy JPEG 2000 at the ratio its header records)."""
    expected = {
        "siim-cr-pa-jpeg.dcm": ("ISO_10918_1", None),
        "nema-rg1-pa-j2k.dcm": ("ISO_15444_1", "10"),
    }
    for path, name in zip(run.files[1:], SOURCES, strict=True):
        sc = pydicom.dcmread(path)
        method, ratio = expected[name]
        assert sc.LossyImageCompression == "01"
        assert sc.LossyImageCompressionMethod == method
        assert sc.get("LossyImageCompressionRatio") == ratio


def dsr2html_text(path: Path) -> str:
    """dcmtk's dsr2html rendering of the SR, as plain text."""
    exe = shutil.which("dsr2html")
    assert exe, "dsr2html missing: run `make test-deps` (Debian package dcmtk)"
    page = subprocess.run([exe, str(path)], capture_output=True, text=True, check=True).stdout
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_dsr2html_names_every_finding_beside_its_score(run: Run) -> None:
    text = dsr2html_text(run.files[0])
    for source in run.sources:
        for finding, score in run.result.findings["images"][source.SOPInstanceUID].items():
            name = FINDING_CODES[finding].meaning
            shown = re.findall(rf"{re.escape(name)}: ([0-9.]+) ", text)
            assert any(abs(float(v) - score) < 1e-6 for v in shown), name
            assert f"{name}: {'Present' if score >= 0.5 else 'Absent'}" in text, name


def test_sr_has_the_tid1500_structure_viewers_need(run: Run) -> None:
    """Image Library (TID 1600) with every source image; per measurement group a Tracking
    Identifier, a Tracking Unique Identifier and a NUM per finding; separate items."""
    sr = pydicom.dcmread(run.files[0])
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    library = next(i for i in sr.ContentSequence if concept(i) == ("DCM", "111028"))
    images = [i for i in content_items(library) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        s.SOPInstanceUID for s in run.sources
    ]
    measurements = next(i for i in sr.ContentSequence if concept(i) == ("DCM", "126010"))
    groups = measurements.ContentSequence
    assert len(groups) == len(SOURCES)
    for group in groups:
        assert concept(group) == ("DCM", "125007")  # Measurement Group
        children = {concept(i): i for i in group.ContentSequence}
        assert children[("DCM", "112039")].ValueType == "TEXT"  # Tracking Identifier
        assert children[("DCM", "112040")].ValueType == "UIDREF"  # Tracking Unique Identifier
        numbers = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        assert sorted(concept(i) for i in numbers) == sorted(
            (c.scheme_designator, c.value) for c in FINDING_CODES.values()
        )
    containers = [i for i in content_items(sr) if i.ValueType == "CONTAINER"]
    assert sr.ContinuityOfContent == "SEPARATE"
    assert {i.ContinuityOfContent for i in containers} == {"SEPARATE"}


def test_sr_equals_what_highdicom_builds_from_the_whole_tree(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SR is given to highdicom's constructor without its items, which are set after
    (it would copy, parse and search them): the object is the same, byte for byte, as the
    constructor builds from the whole report (but for its creation moment)."""
    images = [load_radiograph(i) for i in run.study.instances]
    results = [
        (r, run.model.scores(row))
        for r, row in zip(
            images, run.model.forward(np.stack([r.input for r in images])), strict=True
        )
    ]
    fast = cxr_outputs.build_sr(run.model, results, run.ctx.uids)
    monkeypatch.setattr(cxr_outputs, "_root_without_items", lambda root: root)
    whole = cxr_outputs.build_sr(run.model, results, run.ctx.uids)
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if keyword in whole:
            setattr(fast, keyword, whole[keyword].value)
    equipment = zip(
        fast.ContributingEquipmentSequence, whole.ContributingEquipmentSequence, strict=True
    )
    for ours, theirs in equipment:
        ours.ContributionDateTime = theirs.ContributionDateTime
    assert len(fast.ContentSequence) == len(whole.ContentSequence) > 0
    diff = [e.keyword for e in whole if fast.get(e.tag) != e]
    assert diff == []
    assert encode_dataset(fast) == encode_dataset(whole)
