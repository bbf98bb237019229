"""ImageDb against real SQLite files: the gateway sample, a locked copy, a corrupt file."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest

from service.imagedb import ImageDb
from tests.conftest import shared_file

SAMPLE = "gateway-sample/INPUT/gateway_1"
STUDY = "1.2.276.0.7230010.3.1.2.330040832.1.1707350883.230569"
SOPS = {f"1.2.276.0.7230010.3.1.4.330040832.1.1707350883.{n}" for n in (230571, 230572, 230573)}


@pytest.fixture
def sample_db(tmp_path: Path) -> Path:
    """A writable copy of the real gateway image.db."""
    target = tmp_path / "image.db"
    shutil.copyfile(shared_file(SAMPLE) / "image.db", target)
    return target


def test_sample_db_lists_the_three_instances_of_its_study() -> None:
    db = ImageDb(shared_file(SAMPLE) / "image.db")  # read-only file in a read-only folder
    assert db.expected_instances(STUDY) == SOPS
    assert db.last_error == ""


def test_unknown_study_gives_empty_set_not_other_studies_rows(sample_db: Path) -> None:
    conn = sqlite3.connect(sample_db)
    with conn:
        conn.execute("INSERT INTO study (id, referenceId, StudyInstanceUID) VALUES (2, 1, '1.2.3')")
        conn.execute(
            "INSERT INTO series (id, referenceId, SeriesInstanceUID) VALUES (2, 2, '1.2.3.1')"
        )
        conn.execute("INSERT INTO image (referenceId, SOPInstanceUID) VALUES (2, '1.2.3.1.1')")
    conn.close()
    db = ImageDb(sample_db)
    assert db.expected_instances(STUDY) == SOPS
    assert db.expected_instances("1.2.3") == {"1.2.3.1.1"}
    assert db.expected_instances("1.2.999") == set()


def test_locked_db_returns_none_then_recovers(
    sample_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = sqlite3.connect(sample_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        db = ImageDb(sample_db, busy_timeout_ms=100)
        with caplog.at_level(logging.WARNING, logger="service.imagedb"):
            assert db.expected_instances(STUDY) is None
            assert "locked" in db.last_error
            assert db.expected_instances(STUDY) is None  # same reason: no second warning
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert db.expected_instances(STUDY) == SOPS
    assert db.last_error == ""


def test_garbage_file_returns_none_with_reason(tmp_path: Path) -> None:
    path = tmp_path / "image.db"
    path.write_bytes(b"this is not sqlite at all \x00\x01\x02" * 200)
    db = ImageDb(path)
    assert db.expected_instances(STUDY) is None
    assert "corrupt" in db.last_error
    assert path.read_bytes().startswith(b"this is not sqlite")  # never modified


def test_missing_file_returns_none(tmp_path: Path) -> None:
    db = ImageDb(tmp_path / "image.db")
    assert db.expected_instances(STUDY) is None
    assert "does not exist" in db.last_error
    assert not (tmp_path / "image.db").exists()  # read-only: not created


def test_db_without_gateway_tables_returns_none(tmp_path: Path) -> None:
    path = tmp_path / "image.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other (x TEXT)")
    conn.commit()
    conn.close()
    db = ImageDb(path)
    assert db.expected_instances(STUDY) is None
    assert "lacks table" in db.last_error


def wal_db_with_pending_frames(folder: Path) -> tuple[sqlite3.Connection, str, str]:
    """A WAL-mode copy of the sample image.db in ``folder`` whose newest rows (a study
    with one instance) are only in ``image.db-wal``: the writer stays open, no checkpoint."""
    path = folder / "image.db"
    shutil.copyfile(shared_file(SAMPLE) / "image.db", path)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO study (id, referenceId, StudyInstanceUID) VALUES (7, 1, '1.2.7')")
    writer.execute(
        "INSERT INTO series (id, referenceId, SeriesInstanceUID) VALUES (7, 7, '1.2.7.1')"
    )
    writer.execute("INSERT INTO image (referenceId, SOPInstanceUID) VALUES (7, '1.2.7.1.1')")
    assert (folder / "image.db-wal").stat().st_size > 0
    return writer, "1.2.7", "1.2.7.1.1"


def test_wal_db_is_read_from_a_local_snapshot_that_follows_changes(tmp_path: Path) -> None:
    """A WAL database is read from a copy of image.db and image.db-wal (its newest rows
    included), refreshed when either changes; nothing in the app's folder changes."""
    app = tmp_path / "app"
    app.mkdir()
    writer, study, sop = wal_db_with_pending_frames(app)
    try:
        before = {p.name: p.read_bytes() for p in app.iterdir()}
        db = ImageDb(app / "image.db", copy_dir=tmp_path / "copies")
        assert db.expected_instances(study) == {sop}
        assert db.expected_instances(STUDY) == SOPS
        writer.execute("INSERT INTO image (referenceId, SOPInstanceUID) VALUES (7, '1.2.7.1.2')")
        assert db.expected_instances(study) == {sop, "1.2.7.1.2"}  # the -wal grew: copied again
        after = {p.name: p.read_bytes() for p in app.iterdir()}
    finally:
        writer.close()
    assert set(after) == set(before)  # no -shm or other file created beside it
    assert after["image.db"] == before["image.db"]
    assert (tmp_path / "copies" / "image.db").is_file()


def test_wal_db_without_a_copy_dir_is_read_in_place(tmp_path: Path) -> None:
    writer, study, sop = wal_db_with_pending_frames(tmp_path)
    try:
        assert ImageDb(tmp_path / "image.db").expected_instances(study) == {sop}
    finally:
        writer.close()
