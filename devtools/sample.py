"""The project's own sample input, built from DICOM files that pydicom ships.

``python -m devtools.sample INPUT`` writes ``INPUT/gateway_1`` and ``INPUT/gateway_2`` as the
gateway desktop app does: one folder per study named by Study Instance UID, one file per
instance named by SOP Instance UID (no extension), and an ``image.db`` listing them. The files
get new UIDs (pydicom's root; derived from fixed seeds, so a second run finds everything
present and adds nothing) and the patient name ``SAMPLE^PATIENT``.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from service.fsutil import atomic_writer

logger = logging.getLogger(__name__)

PATIENT_NAME = "SAMPLE^PATIENT"
SEED = "dicom-ai-gateway sample"

#: The gateway app's schema, verbatim (see ../shared/data/README.md).
SCHEMA = """\
CREATE TABLE patient( id INTEGER PRIMARY KEY AUTOINCREMENT, referenceId INTEGER, \
PatientBirthDate TEXT , PatientSex TEXT , PatientName TEXT , PatientID TEXT , \
PatientBirthTime TEXT , RETIRED_OtherPatientIDs TEXT , OtherPatientNames TEXT , \
EthnicGroup TEXT , PatientComments TEXT , NumberOfPatientRelatedStudies TEXT , \
NumberOfPatientRelatedSeries TEXT , NumberOfPatientRelatedInstances TEXT ,  PlaceHoler TEXT );
CREATE INDEX patientIndex ON patient(referenceId);
CREATE TABLE study( id INTEGER PRIMARY KEY AUTOINCREMENT, referenceId INTEGER, \
SpecificCharacterSet TEXT , StudyDate TEXT , StudyTime TEXT , StudyID TEXT , \
AccessionNumber TEXT , ReferringPhysicianName TEXT , StudyDescription TEXT , \
NameOfPhysiciansReadingStudy TEXT , StudyInstanceUID TEXT UNIQUE, \
RETIRED_OtherStudyNumbers TEXT , AdmittingDiagnosesDescription TEXT , PatientAge TEXT , \
PatientSize TEXT , PatientWeight TEXT , Occupation TEXT , AdditionalPatientHistory TEXT , \
NumberOfStudyRelatedSeries TEXT , NumberOfStudyRelatedInstances TEXT , \
ModalitiesInStudy TEXT ,  PlaceHoler TEXT );
CREATE INDEX studyIndex ON study(referenceId);
CREATE TABLE series( id INTEGER PRIMARY KEY AUTOINCREMENT, referenceId INTEGER, \
SeriesNumber TEXT , SeriesInstanceUID TEXT UNIQUE, Modality TEXT , SeriesDescription TEXT , \
SeriesDate TEXT , SeriesTime TEXT , BodyPartExamined TEXT , PatientPosition TEXT , \
ProtocolName TEXT , NumberOfSeriesRelatedInstances TEXT ,  PlaceHoler TEXT );
CREATE INDEX seriesIndex ON series(referenceId);
CREATE TABLE image( id INTEGER PRIMARY KEY AUTOINCREMENT, referenceId INTEGER, \
InstanceNumber TEXT , SOPInstanceUID TEXT UNIQUE, SliceLocation TEXT , ImageType TEXT , \
NumberOfFrames TEXT , Rows TEXT , Columns TEXT , WindowWidth TEXT , WindowCenter TEXT , \
PhotometricInterpretation TEXT , RescaleSlope TEXT , RescaleIntercept TEXT , \
SamplesPerPixel TEXT , PixelSpacing TEXT , BitsAllocated TEXT , BitsStored TEXT , \
HighBit TEXT , PixelRepresentation TEXT , ImagePositionPatient TEXT , \
ImageOrientationPatient TEXT , SOPClassUID TEXT , PrivateCreator TEXT ,  PlaceHoler TEXT );
CREATE INDEX imageIndex ON image(referenceId);
"""

#: Columns the app fills from elsewhere than the same-named DICOM attribute.
NOT_DICOM = {"id", "referenceId", "PlaceHoler", "PrivateCreator"}


@dataclass(frozen=True)
class SampleSeries:
    source: str  # a pydicom test file
    count: int  # instances made from it, one slice apart


#: gateway id -> the series of its one study
PLAN: dict[str, tuple[SampleSeries, ...]] = {
    "1": (SampleSeries("CT_small.dcm", 3),),
    "2": (SampleSeries("MR_small.dcm", 2), SampleSeries("CT_small.dcm", 1)),
}


def _uid(*purpose: str) -> str:
    return str(generate_uid(entropy_srcs=[SEED, *purpose]))


def pydicom_file(name: str) -> Path:
    """The path of ``name`` in the test files that pydicom ships."""
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise FileNotFoundError(f"pydicom test file {name} is missing")
    return Path(path)


def _instance(gateway_id: str, index: int, series: SampleSeries, number: int) -> Dataset:
    """A re-identified copy of ``series.source`` as instance ``number`` of the series."""
    ds = dcmread(pydicom_file(series.source))
    key = (gateway_id, str(index))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = f"SAMPLE-{gateway_id}"
    for keyword in ("OtherPatientIDsSequence", "InstanceCreatorUID"):
        if keyword in ds:
            del ds[keyword]
    ds.StudyInstanceUID = _uid(gateway_id, "study")
    ds.StudyID = f"SAMPLE{gateway_id}"
    ds.AccessionNumber = f"SAMPLE{gateway_id}"
    ds.StudyDescription = "Sample study"
    ds.SeriesInstanceUID = _uid(*key, "series")
    ds.SeriesNumber = index + 1
    ds.FrameOfReferenceUID = _uid(*key, "frame-of-reference")
    ds.SOPInstanceUID = _uid(*key, "instance", str(number))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    if "ImagePositionPatient" in ds:  # stack the copies one slice apart
        spacing = float(ds.get("SliceThickness") or 1.0)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z + (number - 1) * spacing, 4)]
        if "SliceLocation" in ds:
            ds.SliceLocation = round(float(ds.SliceLocation) + (number - 1) * spacing, 4)
    return ds


def _text(ds: Dataset, keyword: str) -> str | None:
    """An attribute as the app stores it: text, multiple values joined by ``\\``, else NULL."""
    value = ds.get(keyword.removeprefix("RETIRED_"))
    if value is None or value == "" or (isinstance(value, list | MultiValue) and not value):
        return None
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def _insert(db: sqlite3.Connection, table: str, values: dict[str, Any]) -> int:
    names = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    cursor = db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(values.values()))
    return int(cursor.lastrowid or 0)


def _row(db: sqlite3.Connection, table: str, ds: Dataset, parent: int) -> dict[str, Any]:
    row: dict[str, Any] = {"referenceId": parent}
    for column in _columns(db, table):
        if column not in NOT_DICOM:
            row[column] = _text(ds, column)
    return row


def _find(db: sqlite3.Connection, table: str, column: str, value: str) -> int | None:
    found = db.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()
    return None if found is None else int(found[0])


def record(db: sqlite3.Connection, ds: Dataset, path: Path) -> None:
    """Add ``ds`` to the gateway's tables unless already there (parents first)."""
    patient = _find(db, "patient", "PatientID", str(ds.PatientID))
    if patient is None:
        patient = _insert(db, "patient", _row(db, "patient", ds, 0))
    study = _find(db, "study", "StudyInstanceUID", str(ds.StudyInstanceUID))
    if study is None:
        study = _insert(db, "study", _row(db, "study", ds, patient))
    series = _find(db, "series", "SeriesInstanceUID", str(ds.SeriesInstanceUID))
    if series is None:
        series = _insert(db, "series", _row(db, "series", ds, study))
    if _find(db, "image", "SOPInstanceUID", str(ds.SOPInstanceUID)) is None:
        row = _row(db, "image", ds, series)
        row["PrivateCreator"] = str(path.resolve())  # the app stores its file path here
        _insert(db, "image", row)


def open_image_db(path: Path) -> sqlite3.Connection:
    """The gateway's ``image.db`` at ``path``, created with the app's schema if new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    if not _find_table(db, "patient"):
        db.executescript(SCHEMA)
    return db


def _find_table(db: sqlite3.Connection, name: str) -> bool:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return found.fetchone() is not None


def build_sample(input_dir: Path) -> list[Path]:
    """Write the sample gateways under ``input_dir``; return every instance file's path.

    Files and rows already present are kept as they are: input is never rewritten.
    """
    paths: list[Path] = []
    for gateway_id, plan in PLAN.items():
        folder = input_dir / f"gateway_{gateway_id}"
        db = open_image_db(folder / "image.db")
        try:
            with db:
                for index, series in enumerate(plan):
                    for number in range(1, series.count + 1):
                        ds = _instance(gateway_id, index, series, number)
                        target = folder / str(ds.StudyInstanceUID) / str(ds.SOPInstanceUID)
                        if not target.exists():
                            with atomic_writer(target) as fh:
                                dcmwrite(fh, ds, enforce_file_format=True)
                        record(db, ds, target)
                        paths.append(target)
        finally:
            db.close()
        logger.info("sample gateway_%s: %d instance(s)", gateway_id, sum(s.count for s in plan))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.sample", description="Build the sample input folders."
    )
    parser.add_argument("input_dir", type=Path, help="the service's INPUT folder")
    args = parser.parse_args(argv)
    paths = build_sample(args.input_dir)
    print(f"sample input: {len(paths)} instance file(s) under {args.input_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
