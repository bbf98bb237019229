"""The service as real processes: serve, SIGTERM/SIGKILL, status, reprocess, run contract."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread

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

PATIENT_NAME = "Doe^Jane"


def run_states(state_dir: Path) -> list[tuple[str, str, str]]:
    rows = ledger_rows(state_dir, "SELECT gateway_id, study_uid, state FROM runs ORDER BY run_id")
    return [(r[0], r[1], r[2]) for r in rows]


def test_drop_while_running_sample_and_mr_series(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "INPUT").mkdir()
    proc = start_service(config)
    try:
        time.sleep(1.0)
        shutil.copytree(shared_file("gateway-sample/INPUT/gateway_1"), tmp_path / "INPUT/gateway_1")
        shutil.copytree(shared_file("gateway-sample/INPUT/gateway_2"), tmp_path / "INPUT/gateway_2")
        mr_uid, _ = copy_series(shared_file("series/mr-phantom-63"), tmp_path / "INPUT/gateway_7")
        wait_for(
            lambda: sum(1 for r in run_states(tmp_path / "STATE") if r[2] == "written") == 3,
            120,
            "three written runs",
        )
        time.sleep(1.0)  # a second event or rescan must not run anything again
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    states = run_states(tmp_path / "STATE")
    assert len(states) == 3 and {s[0] for s in states} == {"1", "2", "7"}
    assert len(list((tmp_path / "OUTPUT/gateway_7" / mr_uid).glob("*.dcm"))) == 63
    assert "gateway=7" in log and "state=written" in log
    assert PATIENT_NAME not in log


def test_slow_chunked_file_is_read_only_when_complete(tmp_path: Path) -> None:
    config = write_config(tmp_path, stable=1.0)
    src = shared_file("series/ct-4-noise")
    study_uid, files = copy_series(src, tmp_path / "staging", limit=1)
    data = files[0].read_bytes()
    target = tmp_path / "INPUT/gateway_1" / study_uid / files[0].name
    target.parent.mkdir(parents=True)
    proc = start_service(config)
    try:
        with target.open("wb") as fh:
            for start in range(0, len(data), len(data) // 6):
                fh.write(data[start : start + len(data) // 6])
                fh.flush()
                time.sleep(0.5)  # slower than nothing, faster than the quiet period
        wait_for(lambda: bool(run_states(tmp_path / "STATE")), 60, "a run")
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    assert [s[2] for s in run_states(tmp_path / "STATE")] == ["written"]
    rejected = ledger_rows(tmp_path / "STATE", "SELECT * FROM instances WHERE state='rejected'")
    assert rejected == []
    assert target.read_bytes() == data


def wait_for_a_run(state_dir: Path) -> None:
    wait_for(lambda: any(r[2] == "running" for r in run_states(state_dir)), 120, "a run")


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while listing
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("workers", [0, 2])
def test_backlog_sigkill_mid_run_then_restart_processes_each_study_once(
    tmp_path: Path, workers: int
) -> None:
    config = write_config(tmp_path, stable=0.2, workers=workers)
    gw = tmp_path / "INPUT/gateway_1"
    mr_uid, _ = copy_series(shared_file("series/mr-phantom-63"), gw)
    ct_uid, _ = copy_series(shared_file("series/ct-4-noise"), gw)
    shutil.copytree(shared_file("gateway-sample/INPUT/gateway_2"), tmp_path / "INPUT/gateway_2")
    before = tree_digest(tmp_path / "INPUT")
    proc = start_service(config)
    try:
        wait_for_a_run(tmp_path / "STATE")
        spawned = children(proc.pid)
    finally:
        kill(proc)  # SIGKILL mid-run
    # the worker processes (and multiprocessing's helper) end with the killed service
    assert len(spawned) >= workers
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in spawned), 30, "orphans")
    proc = start_service(config, "--once", "--once-timeout", "180")
    code, log = wait_service(proc, timeout=240)
    assert code == 0, log
    states = run_states(tmp_path / "STATE")
    assert len(states) == 3
    assert {(g, s) for g, s, _ in states if g == "1"} == {("1", mr_uid), ("1", ct_uid)}
    assert [s[2] for s in states] == ["written"] * 3
    assert temp_files(tmp_path / "OUTPUT", tmp_path / "STATE") == []
    assert len(list((gw.parent.parent / "OUTPUT/gateway_1" / mr_uid).glob("*.dcm"))) == 63
    assert tree_digest(tmp_path / "INPUT") == before
    # a third start finds nothing to do
    code, _ = wait_service(start_service(config, "--once", "--once-timeout", "60"))
    assert code == 0 and len(run_states(tmp_path / "STATE")) == 3


def test_sigterm_finishes_the_runs_already_in_the_workers(tmp_path: Path) -> None:
    config = write_config(tmp_path, stable=0.2, workers=2)
    gw = tmp_path / "INPUT/gateway_1"
    copy_series(shared_file("series/mr-phantom-63"), gw)
    copy_series(shared_file("series/ct-4-noise"), gw)
    proc = start_service(config)
    try:
        wait_for_a_run(tmp_path / "STATE")
    finally:
        code, log = stop_service(proc, timeout=120)
    assert code == 0, log
    states = [s for _, _, s in run_states(tmp_path / "STATE")]
    assert states and "running" not in states, states
    assert set(states) == {"written"}


def test_status_and_health(tmp_path: Path) -> None:
    config = write_config(tmp_path, stable=0.2)
    copy_series(shared_file("series/ct-4-noise"), tmp_path / "INPUT/gateway_3", limit=2)
    code, log = wait_service(start_service(config, "--once", "--once-timeout", "60"))
    assert code == 0, log
    result = run_cli("--config", str(config), "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gateways"]["3"]["studies"] == {"written": 1}
    assert report["service"] == "ran" and report["healthy"] is False  # --once has ended
    assert "no service is running" in report["health"]
    text = run_cli("--config", str(config), "status")
    assert "gateway 3: written=1" in text.stdout
    assert run_cli("--config", str(config), "reprocess", "3", "../x").returncode == 2
    # reprocess carried out by a service: tests/test_commands.py
    health = run_cli("--config", str(config), "status", "--health")
    assert health.returncode == 1, health.stdout  # --once has ended: nobody serves STATE
    assert "no service is running" in health.stdout


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[defaults]\nstable_seconds = 'soon'\n")
    result = run_cli("--config", str(config), "status")
    assert result.returncode == 2
    assert "defaults.stable_seconds" in result.stderr


@pytest.mark.parametrize("nested", [True, False])
def test_run_contract_nested_dicom_in_dicom_out(tmp_path: Path, nested: bool) -> None:
    config = write_config(tmp_path)
    dicom_in = tmp_path / "in"
    src = shared_file("series/ct-4-noise")
    for i, path in enumerate(sorted(src.iterdir())):
        target = dicom_in / ("a/b" if nested and i % 2 else "") / f"file{i}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    series_uid = str(dcmread(sorted(src.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID)
    result = run_cli(
        "--config", str(config), "run", str(dicom_in), str(tmp_path / "out"), series_uid
    )
    assert result.returncode == 0, result.stderr
    outputs = sorted((tmp_path / "out").glob("*.dcm"))
    assert len(outputs) == 4
    assert all(dcmread(p).SeriesInstanceUID != series_uid for p in outputs)


def test_run_contract_exit_codes(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    missing = run_cli("--config", str(config), "run", str(tmp_path / "nope"), str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x").write_bytes(b"not dicom")
    bad = run_cli("--config", str(config), "run", str(junk), str(tmp_path / "o"))
    assert bad.returncode == 1 and "no usable input" in bad.stderr
    # the default rules route only chest radiographs: a CT is skipped with the reason
    default = tmp_path / "default.toml"
    default.write_text("")
    ct = tmp_path / "ct"
    copy_series(shared_file("series/ct-4-noise"), ct, limit=1)
    skipped = run_cli("--config", str(default), "run", str(ct), str(tmp_path / "o"))
    assert skipped.returncode == 3 and "no routing rule matches" in skipped.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GATEWAY_* variables from the environment the tests run in."""
    import os

    for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_config_file_paths_do_not_depend_on_the_current_directory(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config <dir>/gateway.toml status` from another folder reads <dir>/STATE."""
    from service.cli import main

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "gateway.toml").write_text('[service]\nstate_dir = "STATE"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean_env.chdir(elsewhere)
    assert main(["--config", str(folder / "gateway.toml"), "status", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["ledger"] == str(folder / "STATE" / "ledger.sqlite3")


def test_unknown_gateway_variable_is_logged_not_an_exit(
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli import main

    clean_env.setenv("GATEWAY_PORT", "8080")
    clean_env.setenv("GATEWAY_STATE_DIR", str(tmp_path / "STATE"))
    assert main(["status", "--json"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("GATEWAY_PORT" in w for w in warnings), warnings
    assert not any("8080" in w for w in warnings)
    assert json.loads(capsys.readouterr().out)["service"] == "not run yet"


def test_config_show_prints_the_effective_configuration_per_gateway(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    config = tmp_path / "gateway.toml"
    config.write_text('[service]\ninput_dir = "IN"\n[gateways.7]\nlayout = "flat"\n')
    (tmp_path / "IN" / "gateway_3").mkdir(parents=True)
    clean_env.setenv("GATEWAY_PACS_HOST", "orthanc")
    clean_env.chdir(tmp_path / "IN")
    assert main(["--config", str(config), "config", "--show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown["gateways"]) == ["3", "7", "*"]
    assert shown["gateways"]["7"]["pacs"]["host"] == {
        "value": "orthanc",
        "source": "env",
        "from": "GATEWAY_PACS_HOST",
    }
    assert main(["config", "--config", str(config), "--show"]) == 0
    text = capsys.readouterr().out
    assert f'input_dir = "{tmp_path / "IN"}"' in text and "# file service.input_dir" in text
    with pytest.raises(SystemExit) as exit_:
        main(["config"])
    assert exit_.value.code == 2
