"""Fault injection with the service as a real process: bursts, disk full, SIGKILL at each
stage, clock skew, gateway isolation and privacy of everything it prints or records.

Outcomes are recorded for ``bench/faults.py`` like in :mod:`tests.test_faults`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from service.conformance import check_file
from tests.conftest import shared_file
from tests.helpers import (
    copy_series,
    kill,
    ledger_rows,
    run_cli,
    start_service,
    stop_service,
    temp_files,
    tree_digest,
    wait_for,
    wait_service,
    write_config,
)
from tests.test_faults import (
    FINAL_STATES,
    CountingScp,
    changed_inputs,
    lost_count,
    record,
    study_states,
)

ONCE = ("--once", "--once-timeout", "120")


def runs(state_dir: Path) -> list[sqlite3.Row]:
    return ledger_rows(state_dir, "SELECT * FROM runs ORDER BY run_id")


def outputs(state_dir: Path, run_id: int) -> list[sqlite3.Row]:
    return ledger_rows(state_dir, "SELECT * FROM outputs WHERE run_id=?", (run_id,))


# -- 2. a study arriving in two bursts ------------------------------------------------------


def test_two_bursts_give_two_linked_runs_with_new_series(tmp_path: Path) -> None:
    config = write_config(tmp_path, stable=0.5)
    src = sorted(shared_file("series/ct-4-noise").iterdir())
    staging = tmp_path / "staging"
    study_uid, files = copy_series(src[0].parent, staging)
    gw = tmp_path / "INPUT" / "gateway_1"
    gw.mkdir(parents=True)
    state = tmp_path / "STATE"
    proc = start_service(config)
    try:
        (gw / study_uid).mkdir()
        for f in files[:2]:
            shutil.copyfile(f, gw / study_uid / f.name)
        wait_for(lambda: [r["state"] for r in runs(state)] == ["written"], 60, "first run")
        time.sleep(1.5)  # well over the quiet period: the second burst is a separate event
        for f in files[2:]:
            shutil.copyfile(f, gw / study_uid / f.name)
        wait_for(lambda: [r["state"] for r in runs(state)] == ["written"] * 2, 60, "second run")
    finally:
        code, log = stop_service(proc)
    staged = {f"gateway_1/{study_uid}/{f.name}": f.read_bytes() for f in files}
    first, second = runs(state)
    series = [{o["series_uid"] for o in outputs(state, r["run_id"])} for r in (first, second)]
    counts = [len(outputs(state, r["run_id"])) for r in (first, second)]
    record(
        "2 two bursts",
        "2 CT, then 2 more after the quiet period (service running)",
        "2 runs written (2 then 4 outputs), run 2 -> previous run 1, new series",
        f"{[r['state'] for r in (first, second)]} outputs {counts}, "
        f"previous_run_id={second['previous_run_id']}",
        lost_count(staged, state, gw.parent),
    )
    assert code == 0, log
    assert second["previous_run_id"] == first["run_id"]
    assert first["inputs_digest"] != second["inputs_digest"]
    assert counts == [2, 4]
    assert not series[0] & series[1]
    assert sorted(p.name for p in (gw / study_uid).iterdir()) == sorted(f.name for f in files)


# -- 4. disk full while writing OUTPUT ------------------------------------------------------


@pytest.fixture
def small_output(tmp_path: Path) -> Iterator[Path]:
    """OUTPUT on a 700 KiB tmpfs: one 512x512 CT output fits, the second does not."""
    target = tmp_path / "OUTPUT"
    target.mkdir()
    mount = shutil.which("mount")
    proc = subprocess.run(
        [mount or "mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(
            "cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): "
            + (proc.stderr.strip() or f"exit {proc.returncode}")
        )
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_disk_full_waits_and_the_same_run_completes_when_space_returns(
    tmp_path: Path, small_output: Path
) -> None:
    """ENOSPC is transient: the study waits (no failed run), nothing truncated is left, and
    the same run (same output UIDs) is written by itself once space comes back."""
    config = write_config(tmp_path, stable=0.2)
    gw = tmp_path / "INPUT" / "gateway_1"
    study_uid, files = copy_series(shared_file("series/ct-4-noise"), gw, limit=2)
    sources = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    before = tree_digest(tmp_path / "INPUT")
    state = tmp_path / "STATE"
    service = start_service(config)
    try:
        sql = "SELECT reason FROM studies WHERE study_uid=?"  # [] until the ledger is made
        wait_for(
            lambda: any(
                "No space left" in r["reason"] for r in ledger_rows(state, sql, (study_uid,))
            ),
            60,
            "the study waiting on the full disk",
        )
        waiting = study_states(state)[("1", study_uid)]
        during = runs(state)
        leftovers = temp_files(small_output)
        present = list(small_output.rglob("*.dcm"))
        complete = [p for p in present if check_file(p, source_sop_uids=sources) == []]
        # space comes back: nobody asks, the study is retried by itself
        remount = ["mount", "-o", "remount,size=20m", "tmpfs", str(small_output)]
        subprocess.run(remount, check=True)
        wait_for(lambda: study_states(state)[("1", study_uid)][0] == "written", 60, "written")
    finally:
        code, log = stop_service(service)
    assert code == 0, log
    rows = runs(state)
    new_outputs = outputs(state, rows[-1]["run_id"])
    lost = lost_count(before, state, tmp_path / "INPUT")
    record(
        "4 disk full on OUTPUT",
        "2 CT (~525 KB out each) to a 700 KiB tmpfs, then 20 MiB, no operator action",
        "waiting (ENOSPC, retried), no .tmp-/truncated file; the same run written",
        f"{waiting[0]}: ...{waiting[1][-40:]}; tmp {len(leftovers)}, "
        f"incomplete {len(present) - len(complete)}; then {rows[-1]['state']}, runs {len(rows)}",
        lost,
    )
    assert waiting[0] == "waiting" and "retry" in waiting[1]
    assert [r["state"] for r in during] == ["running"]  # not failed: tried again
    assert leftovers == [] and len(complete) == len(present)
    assert [r["state"] for r in rows] == ["written"]  # one run, resumed
    assert len(new_outputs) == 2
    assert all(check_file(Path(o["path"]), source_sop_uids=sources) == [] for o in new_outputs)
    assert lost == 0


# -- 5. SIGKILL at each stage ---------------------------------------------------------------


def _stage_reached(state: Path, stage: str, scp: CountingScp) -> bool:
    rows = ledger_rows(state, "SELECT state FROM studies")
    study = rows[0]["state"] if rows else ""
    run = runs(state)
    written = ledger_rows(state, "SELECT COUNT(*) AS n FROM outputs")
    n_out = written[0]["n"] if written else 0
    if stage == "receiving":
        return study == "receiving"
    if stage == "running":
        return bool(run) and run[0]["state"] == "running" and n_out == 0
    if stage == "writing":  # outputs on disk, not yet recorded (one transaction records them)
        on_disk = any((state.parent / "OUTPUT").rglob("*.dcm"))
        return bool(run) and run[0]["state"] == "running" and on_disk
    return study == "sending" and len(scp.stored) > 0


def _poll_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("stage", ["receiving", "running", "writing", "sending"])
def test_sigkill_at_each_stage_ends_once_without_duplicate_sends(
    tmp_path: Path, stage: str
) -> None:
    scp = CountingScp(delay=0.2 if stage == "sending" else 0.0)
    try:
        config = write_config(tmp_path, f"[pacs]\n{_pacs(scp)}", stable=0.3)
        gw = tmp_path / "INPUT" / "gateway_1"
        copy_series(shared_file("series/mr-phantom-63"), gw)
        before = tree_digest(tmp_path / "INPUT")
        state = tmp_path / "STATE"
        proc = start_service(config)
        try:
            hit = _poll_until(lambda: _stage_reached(state, stage, scp), 120)
        finally:
            kill(proc)
        assert hit, f"never saw the service in stage {stage}"
        code, log = wait_service(start_service(config, *ONCE))
        assert code == 0, log
        final = study_states(state)
        all_runs = runs(state)
        sends = ledger_rows(state, "SELECT state, reason FROM sends ORDER BY send_id")
        run_outputs = {o["sop_instance_uid"] for o in outputs(state, all_runs[-1]["run_id"])}
        stored = list(scp.stored)
        associations = scp.associations
    finally:
        scp.shutdown()
    lost = lost_count(before, state, tmp_path / "INPUT")
    expected = (
        "send_failed (interrupted), 1 association" if stage == "sending" else "sent, 1 assoc."
    )
    (study_state, reason), *more = final.values()
    record(
        f"5 SIGKILL while {stage}",
        "MR 63 files, slow SCP" if stage == "sending" else "MR 63 files",
        expected,
        f"{study_state} ({reason[:40]}); runs {len(all_runs)}, associations {associations}, "
        f"stored {len(stored)} ({len(set(stored))} distinct); tmp {len(temp_files(tmp_path))}",
        lost,
    )
    assert more == [] and study_state in FINAL_STATES
    assert len(all_runs) == 1 and temp_files(tmp_path) == []
    assert associations == 1 and len(stored) == len(set(stored))
    assert len(run_outputs) == 63
    assert len(list((tmp_path / "OUTPUT").rglob("*.dcm"))) == 63
    if stage == "sending":
        assert study_state == "send_failed" and "interrupted" in reason
        assert [s["state"] for s in sends] == ["interrupted"]
        assert set(stored) < run_outputs
    else:
        assert study_state == "sent", reason
        assert set(stored) == run_outputs
    assert lost == 0


def _pacs(scp: CountingScp) -> str:
    return f'host = "127.0.0.1"\nport = {scp.port}\nae_title = "{scp.ae_title}"\n'


# -- 6. clock skew ------------------------------------------------------------------------


def test_skewed_mtimes_still_follow_the_quiet_period(tmp_path: Path) -> None:
    config = write_config(tmp_path, stable=1.0)
    src = sorted(shared_file("series/ct-4-noise").iterdir())
    gw = tmp_path / "INPUT" / "gateway_1"
    gw.mkdir(parents=True)
    state = tmp_path / "STATE"
    skews = {"future": 3600.0, "past": -3600.0}
    targets: dict[str, tuple[bytes, Path, float]] = {}
    for (name, skew), path in zip(skews.items(), src[:2], strict=True):
        ds = dcmread(path)
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.999.77.{len(targets) + 1}"
        folder = gw / ds.StudyInstanceUID
        folder.mkdir()
        staged = tmp_path / f"{name}.dcm"
        ds.save_as(staged)
        targets[name] = (staged.read_bytes(), folder / str(ds.SOPInstanceUID), time.time() + skew)
    proc = start_service(config)
    runs_while_changing = []
    try:
        # every file grows by a chunk every 0.3 s (< stable_seconds) while its mtime stays
        # pinned one hour in the future or the past
        chunks = 10
        for i in range(1, chunks + 1):
            for data, target, mtime in targets.values():
                with target.open("ab") as fh:
                    fh.write(data[len(data) * (i - 1) // chunks : len(data) * i // chunks])
                os.utime(target, (mtime, mtime))
            time.sleep(0.3)
            runs_while_changing.append(len(runs(state)))
        wait_for(lambda: len(runs(state)) == 2, 60, "both skewed studies processed")
        time.sleep(1.5)  # and not again
    finally:
        code, log = stop_service(proc)
    final = study_states(state)
    rejected = ledger_rows(state, "SELECT * FROM instances WHERE state='rejected'")
    record(
        "6 clock skew",
        "2 studies, mtimes +1 h / -1 h, growing for 3 s (stable 1 s)",
        "no run while changing; each written once afterwards",
        f"runs while changing max {max(runs_while_changing)}; "
        f"final {sorted(s for s, _ in final.values())}, runs {len(runs(state))}",
        sum(t.read_bytes() != d for d, t, _ in targets.values()),
    )
    assert code == 0, log
    assert max(runs_while_changing) == 0
    assert sorted(s for s, _ in final.values()) == ["written", "written"]
    assert len(runs(state)) == 2 and rejected == []


# -- 9. gateway isolation ---------------------------------------------------------------------


def test_two_gateways_same_study_uid_never_cross(tmp_path: Path) -> None:
    shutil.copytree(shared_file("gateway-sample/INPUT"), tmp_path / "INPUT")
    scps = {"1": CountingScp("GW1PACS"), "2": CountingScp("GW2PACS")}
    try:
        extra = "".join(
            f"[gateways.{gid}]\npacs = {scp.pacs_toml()}\n" for gid, scp in scps.items()
        )
        config = write_config(tmp_path, extra, stable=0.2)
        before = tree_digest(tmp_path / "INPUT")
        code, log = wait_service(start_service(config, *ONCE))
        stored = {gid: set(scp.stored) for gid, scp in scps.items()}
        assoc = {gid: scp.associations for gid, scp in scps.items()}
    finally:
        for scp in scps.values():
            scp.shutdown()
    state = tmp_path / "STATE"
    by_gateway: dict[str, set[str]] = {"1": set(), "2": set()}
    for run in runs(state):
        by_gateway[run["gateway_id"]] |= {
            o["sop_instance_uid"] for o in outputs(state, run["run_id"])
        }
    on_disk = {
        gid: {p.stem for p in (tmp_path / "OUTPUT" / f"gateway_{gid}").rglob("*.dcm")}
        for gid in ("1", "2")
    }
    instances = ledger_rows(state, "SELECT gateway_id, path FROM instances")
    lost = lost_count(before, state, tmp_path / "INPUT")
    record(
        "9 gateway isolation",
        "gateway-sample: 2 gateways, same StudyInstanceUID, one SCP each",
        "each SCP gets only its gateway's 3 outputs, 1 association each",
        f"states {sorted(s for s, _ in study_states(state).values())}, stored "
        f"{ {g: len(s) for g, s in stored.items()} }, associations {assoc}",
        lost,
    )
    assert code == 0, log
    assert sorted(s for s, _ in study_states(state).values()) == ["sent", "sent"]
    assert len(by_gateway["1"]) == len(by_gateway["2"]) == 3
    assert not by_gateway["1"] & by_gateway["2"]
    for gid in ("1", "2"):
        assert stored[gid] == by_gateway[gid] == on_disk[gid]
        assert assoc[gid] == 1
    assert instances and all(
        f"{os.sep}gateway_{r['gateway_id']}{os.sep}" in r["path"] for r in instances
    )
    assert lost == 0


# -- 11. privacy -----------------------------------------------------------------------------

PATIENT = {
    "PatientName": "Qzxv^Wyndolyn",
    "PatientID": "PID7734219",
    "PatientBirthDate": "19230417",
}
SECRETS = ("Qzxv", "Wyndolyn", "PID7734219", "19230417", "1923-04-17")


def test_no_patient_identifier_in_logs_ledger_or_status(tmp_path: Path) -> None:
    scp = CountingScp()
    try:
        config = write_config(tmp_path, f"[pacs]\n{_pacs(scp)}", stable=0.2)
        src = sorted(shared_file("series/ct-4-noise").iterdir())
        gw = tmp_path / "INPUT" / "gateway_1"
        for i, path in enumerate(src):
            ds = dcmread(path)
            for keyword, value in PATIENT.items():
                setattr(ds, keyword, value)
            if i == 3:  # a second study whose derived copy fails the conformance gate
                ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.999.78.1"
                ds.Modality = ""
            folder = gw / str(ds.StudyInstanceUID)
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / str(ds.SOPInstanceUID))
            if i == 0:  # and a file rejected for conflicting content
                ds.InstanceNumber = 77
                ds.save_as(folder / "conflict")
        (gw / "junk-study-1.2.3").mkdir()
        (gw / "junk-study-1.2.3" / "x").write_bytes(b"Qzxv^Wyndolyn PID7734219 19230417")
        before = tree_digest(gw)
        env = {"GATEWAY_LOG_LEVEL": "DEBUG"}
        code, log = wait_service(start_service(config, *ONCE, env=env))
    finally:
        scp.shutdown()
    state = tmp_path / "STATE"
    status_text = run_cli("--config", str(config), "status")
    status_json = run_cli("--config", str(config), "status", "--json")
    db = sqlite3.connect(state / "ledger.sqlite3")
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    ledger_text = json.dumps(
        {t: [list(map(str, row)) for row in db.execute(f"SELECT * FROM {t}")] for t in tables}
    )
    db.close()
    final = sorted(s for s, _ in study_states(state).values())
    everything = {
        "log": log,
        "status": status_text.stdout + status_text.stderr,
        "status --json": status_json.stdout + status_json.stderr,
        "ledger": ledger_text,
    }
    leaks = sorted(
        f"{secret} in {where}"
        for where, text in everything.items()
        for secret in SECRETS
        if secret in text
    )
    record(
        "11 privacy",
        "3 studies with known name/ID/birth date, DEBUG log, send + gate failure + rejects",
        "no identifier in log, ledger, status",
        f"studies {final}; {len(log.splitlines())} log lines; leaks {leaks or 'none'}",
        len(changed_inputs(before, gw)),
    )
    assert code == 0, log
    assert "DEBUG" in log and "state=sent" in log and "quarantined" in log
    assert final == ["failed", "sent", "skipped"]
    assert leaks == []
