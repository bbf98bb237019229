"""Test helpers: configs, copies of real studies, ledger queries, service subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from service.ledger import Ledger, NewRun, SendChange, Transition
from service.values import RunState, SendState, StudyState

if TYPE_CHECKING:
    from tests.peers import Peer

ROOT = Path(__file__).resolve().parent.parent


def stored_uid(event: evt.Event) -> str:
    """The SOP Instance UID of a C-STORE request, in an ``EVT_C_STORE`` handler."""
    request = event.request
    assert isinstance(request, C_STORE)
    return str(request.AffectedSOPInstanceUID)


def write_config(
    tmp_path: Path,
    extra: str = "",
    stable: float = 0.3,
    workers: int = 0,
    *,
    rules: str = '[{ model = "annotate" }]',
    max_wait: float = 3,
    **service: object,
) -> Path:
    """A config with folders under ``tmp_path`` routing everything to ``annotate`` (unless
    ``rules``), runs in the service process (unless ``workers``), quick rescans and stops;
    ``service`` adds or overrides ``[service]`` keys, ``extra`` appends sections."""
    settings: dict[str, object] = {
        "input_dir": str(tmp_path / "INPUT"),
        "output_dir": str(tmp_path / "OUTPUT"),
        "state_dir": str(tmp_path / "STATE"),
        "uid_root": "1.2.826.0.1.3680043.10.999.",
        "rescan_seconds": 2,
        "poll_seconds": 0.5,
        "shutdown_seconds": 20,
        "workers": workers,
        "http": "",  # no console (a fixed port would collide across parallel tests)
        **service,
    }
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[service]
{lines}
[defaults]
stable_seconds = {stable}
max_wait_seconds = {max_wait}
rules = {rules}
{extra}
"""
    )
    return path


def copy_series(src: Path, gateway_dir: Path, limit: int | None = None) -> tuple[str, list[Path]]:
    """Copy real DICOM files into ``gateway_dir/<StudyUID>/<SOPUID>`` as a gateway app does."""
    files = sorted(p for p in src.rglob("*") if p.is_file())[:limit]
    study_uid = ""
    copied = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        study_uid = str(ds.StudyInstanceUID)
        target = gateway_dir / study_uid / str(ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied.append(target)
    return study_uid, copied


def ledger_rows(state_dir: Path, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return list(db.execute(sql, params))
    except sqlite3.OperationalError:
        return []  # schema not created yet
    finally:
        db.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_service(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``python main.py --config CONFIG serve ARGS`` as a real process."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config), "serve", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_service(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    """SIGTERM the service; return its exit code and everything it logged."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_service(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    """Wait for a ``serve --once`` process to finish by itself."""
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def temp_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob(".tmp-*")]


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file's bytes under ``root`` (to prove inputs were not touched)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


#: Whether service/engine.py carries out the CLI's resend/reprocess requests (it answers them
#: with service.requests.write_result). Until it does, the tests that need a service to
#: carry a request out are skipped, saying so.


def ledger_run(
    ledger: Ledger,
    study_uid: str,
    *,
    gateway_id: str = "1",
    model: str = "annotate",
    timings: dict[str, float] | None = None,
    outcome: str = "success",
) -> tuple[int, int | None]:
    """One run of ``study_uid`` recorded through the ledger's ordinary transitions, as the
    engine makes them: started ``running``; then, unless ``outcome`` is ``running``,
    ``failed`` or ``skipped``, ended ``written`` with ``timings`` and a queued send, which
    stays ``queued`` or opens and ends with the send state ``outcome``. (run_id, send_id)."""
    started = ledger.apply(
        Transition(
            gateway_id,
            study_uid,
            StudyState.RUNNING,
            new_run=NewRun(model, "1.0", f"digest-{study_uid}", 1, 0),
        )
    )
    run = started.run_id
    assert run is not None
    if outcome == "running":
        return run, None
    if outcome in (RunState.FAILED, RunState.SKIPPED):
        state = RunState(outcome)
        study = StudyState.FAILED if state == RunState.FAILED else StudyState.SKIPPED
        ledger.apply(
            Transition(gateway_id, study_uid, study, "test", run_id=run, run=state, timings=timings)
        )
        return run, None
    send = ledger_written(ledger, gateway_id, study_uid, run, timings)
    if outcome != SendState.QUEUED:
        ledger_send(ledger, gateway_id, study_uid, run, send, SendState(outcome))
    return run, send


def ledger_written(
    ledger: Ledger,
    gateway_id: str,
    study_uid: str,
    run: int,
    timings: dict[str, float] | None = None,
) -> int:
    """Run ``run`` ended ``written`` with ``timings`` and a queued send (its send_id)."""
    send = ledger.apply(
        Transition(
            gateway_id,
            study_uid,
            StudyState.WRITTEN,
            run_id=run,
            run=RunState.WRITTEN,
            timings=timings,
            send=SendChange(SendState.QUEUED, destination="PACS@127.0.0.1:4242"),
        )
    ).send_id
    assert send is not None
    return send


def ledger_send(
    ledger: Ledger, gateway_id: str, study_uid: str, run: int, send: int, outcome: SendState
) -> None:
    """Send ``send`` of ``run`` opened, then ended ``outcome`` (ordinary transitions)."""
    ledger.apply(
        Transition(
            gateway_id,
            study_uid,
            StudyState.SENDING,
            run_id=run,
            run=RunState.SENDING,
            send=SendChange(SendState.SENDING, send),
        )
    )
    ok = outcome in (SendState.SUCCESS, SendState.WARNING)
    ledger.apply(
        Transition(
            gateway_id,
            study_uid,
            StudyState.SENT if ok else StudyState.SEND_FAILED,
            run_id=run,
            run=RunState.SENT if ok else RunState.SEND_FAILED,
            send=SendChange(outcome, send, reason="" if ok else "test"),
        )
    )


def pacs_of(peer: Peer) -> str:
    """The ``[pacs]`` section of a config sending to ``peer`` on loopback."""
    return f'[pacs]\nhost = "127.0.0.1"\nport = {peer.port}\nae_title = "{peer.ae_title}"\n'
