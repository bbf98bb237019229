"""Several ``serve`` nodes as real processes over one ledger: the harness of the scale tests
(tests/test_scale.py) and bench (bench/scale.py).

* :class:`Receiver`: a real pynetdicom Storage SCP that counts every SOP Instance UID it is
  sent (an optional pause per instance keeps sends open long enough to be caught in flight);
* :func:`stage_studies` / :func:`drop`: studies made from a real DICOM file (pydicom's
  ``CT_small.dcm``, the file the project's sample is built from) with new UIDs, spread over
  gateways, dropped into INPUT as the gateway app does (files, then the ``image.db`` rows);
* :class:`Cluster`: N ``python main.py serve`` processes, each with its own STATE and node
  name, sharing INPUT, OUTPUT and one ledger (a ``postgresql://`` URL, or none: SQLite in
  the single node's STATE), short leases, the fast ``annotate`` model in the service process;
  nodes are started, SIGKILLed, stopped and restarted one by one;
* reads of the ledger through its read-only API (:meth:`Ledger.open_readonly`), never a
  write: :meth:`Cluster.states`, :meth:`Cluster.wait_final`, :meth:`Cluster.deliveries`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from devtools.sample import open_image_db, pydicom_file, record
from service.ledger import Ledger, LedgerUnavailable
from service.values import FINAL_STUDY_STATES
from tests.conftest import free_port
from tests.helpers import stored_uid, write_config

ROOT = Path(__file__).resolve().parent.parent
FINAL = frozenset(str(s) for s in FINAL_STUDY_STATES)


class Receiver:
    """A pynetdicom Storage SCP on loopback counting each SOP Instance UID stored."""

    def __init__(self, delay: float = 0.0, ae_title: str = "SCALESCP") -> None:
        self.ae_title = ae_title
        self.delay = delay
        self.counts: Counter[str] = Counter()
        self.associations = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax))
        ae.maximum_associations = 64
        self.port = free_port()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_ACCEPTED, self._accepted),
        ]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self._server: ThreadedAssociationServer = server

    def _accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def _store(self, event: evt.Event) -> int:
        if self.delay:
            time.sleep(self.delay)
        uid = stored_uid(event)
        with self._lock:
            self.counts[uid] += 1
        return 0x0000

    def pacs(self) -> str:
        """The ``[pacs]`` section that sends to this receiver."""
        return (
            f'[pacs]\nhost = "127.0.0.1"\nport = {self.port}\nae_title = "{self.ae_title}"\n'
            "timeout_seconds = 30\n"
        )

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def close(self) -> None:
        self._server.shutdown()


@dataclass
class Staged:
    """One study prepared outside INPUT: its gateway and datasets, written as files."""

    gateway_id: str
    study_uid: str
    files: list[tuple[Dataset, Path]]


def stage_studies(
    staging: Path, count: int, gateways: Sequence[str] = ("1", "2", "3"), instances: int = 2
) -> list[Staged]:
    """``count`` studies of ``instances`` CT images each (pydicom's CT_small with new UIDs),
    dealt round-robin over ``gateways``."""
    source = dcmread(pydicom_file("CT_small.dcm"))
    studies = []
    for n in range(count):
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = staging / study_uid
        folder.mkdir(parents=True)
        files = []
        for number in range(1, instances + 1):
            ds = source.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = number
            path = folder / str(ds.SOPInstanceUID)
            ds.save_as(path, enforce_file_format=True)
            files.append((ds, path))
        studies.append(Staged(gateways[n % len(gateways)], study_uid, files))
    return studies


def drop(studies: Sequence[Staged], input_dir: Path) -> None:
    """Copy each study into ``INPUT/gateway_<id>/<StudyUID>/``, then add its ``image.db``
    rows, as the gateway app does."""
    for study in studies:
        gateway = input_dir / f"gateway_{study.gateway_id}"
        target = gateway / study.study_uid
        target.mkdir(parents=True, exist_ok=True)
        copied = []
        for ds, path in study.files:
            (target / path.name).write_bytes(path.read_bytes())
            copied.append((ds, target / path.name))
        db = open_image_db(gateway / "image.db")
        try:
            with db:
                for ds, path in copied:
                    record(db, ds, path)
        finally:
            db.close()


@dataclass
class Node:
    """One ``serve`` process: its own folder (config, STATE, log), restartable."""

    name: str
    folder: Path
    config: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.folder / "serve.log"

    def start(self, failpoints: str = "") -> None:
        """Start (or start again) ``python main.py serve``; its output appends to the log."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(self.env)
        if failpoints:
            env["GATEWAY_FAILPOINTS"] = failpoints
        with open(self.log, "ab") as fh:
            fh.write(f"--- start {self.starts + 1} of {self.name}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), "--config", str(self.config), "serve"],
                cwd=ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> int | None:
        """The exit code once the process ended by itself (recorded once), else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.exits.append(code)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL (nothing flushed, no lease given up), as a power cut leaves a node."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait: the exit code (None when it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    """``len(names)`` nodes over ``root/INPUT`` and ``root/OUTPUT`` and one ledger.

    ``ledger`` is a ``postgresql://`` URL, or ``""`` for SQLite in the (single) node's
    STATE. Leases (``intake_lease_seconds``, ``run_lease_seconds``) are ``lease`` seconds;
    ``roles`` gives a node's ``roles`` (default: every role). Nodes run the ``annotate``
    model in the service process (``workers = 0``)."""

    def __init__(
        self,
        root: Path,
        ledger: str,
        receiver: Receiver,
        names: Sequence[str],
        *,
        lease: float = 8,
        roles: dict[str, str] | None = None,
        gateways: Sequence[str] = ("1", "2", "3"),
        stable: float = 0.3,
    ) -> None:
        assert ledger or len(names) == 1, "several nodes need a PostgreSQL ledger"
        self.root = root
        self.ledger = ledger
        self.receiver = receiver
        self.input = root / "INPUT"
        self.output = root / "OUTPUT"
        for gateway_id in gateways:  # present at start: each node sees every gateway at once
            (self.input / f"gateway_{gateway_id}").mkdir(parents=True, exist_ok=True)
        self.nodes: list[Node] = []
        for name in names:
            folder = root / name
            folder.mkdir(parents=True)
            config = write_config(
                folder,
                receiver.pacs(),
                stable=stable,
                node_name=name,
                input_dir=str(self.input),
                output_dir=str(self.output),
                ledger=ledger,
                intake_lease_seconds=lease,  # both unused on SQLite
                run_lease_seconds=lease,
                roles=(roles or {}).get(name, "intake,run,send"),
            )
            self.nodes.append(Node(name, folder, config, {}))

    def node(self, name: str) -> Node:
        (found,) = [n for n in self.nodes if n.name == name]
        return found

    def start(self, failpoints: str = "") -> None:
        for node in self.nodes:
            node.start(failpoints)

    def close(self) -> dict[str, int | None]:
        """SIGTERM every running node (SIGKILL after 60 s); their exit codes."""
        return {node.name: node.stop() for node in self.nodes}

    # -- reads (the ledger's read-only API) -------------------------------------------------

    @property
    def location(self) -> str | Path:
        return self.ledger or self.nodes[0].folder / "STATE" / "ledger.sqlite3"

    @contextmanager
    def reader(self) -> Iterator[Ledger | None]:
        """The ledger opened read-only (None until a node has created it)."""
        ledger = Ledger.open_readonly(self.location)
        try:
            yield ledger
        finally:
            if ledger is not None:
                ledger.close()

    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query; none while the ledger or its tables do not exist yet
        (an SQLite file is created a moment before its tables)."""
        with self.reader() as ledger:
            if ledger is None:
                return []
            try:
                return [dict(r) for r in ledger.query(sql, params)]
            except LedgerUnavailable as exc:
                if "no such table" in str(exc):
                    return []
                raise

    def states(self) -> dict[tuple[str, str], str]:
        return {
            (r["gateway_id"], r["study_uid"]): r["state"]
            for r in self.query("SELECT gateway_id, study_uid, state FROM studies")
        }

    def final_count(self) -> int:
        return sum(state in FINAL for state in self.states().values())

    def wait_final(
        self,
        count: int,
        timeout: float,
        tick: Callable[[], None] | None = None,
        poll: float = 0.2,
    ) -> float:
        """Wait until ``count`` studies are recorded and every one is final; call ``tick``
        each poll (a supervisor's check). The monotonic time it happened (within ``poll``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states()
            if len(states) == count and all(s in FINAL for s in states.values()):
                return time.monotonic()
            if tick is not None:
                tick()
            time.sleep(poll)
        left = Counter(s for s in self.states().values())
        raise AssertionError(f"timed out after {timeout:.0f} s: {count} studies final; {left}")

    def in_flight(self) -> dict[str, int]:
        """Per node: its runs not yet final (running, written, sending)."""
        rows = self.query(
            "SELECT node, count(*) AS n FROM runs"
            " WHERE state IN ('running', 'written', 'sending') GROUP BY node"
        )
        return {r["node"]: int(r["n"]) for r in rows}

    def intake_holders(self) -> dict[str, str]:
        """Gateway id → the node holding its live ``intake:<id>`` lease."""
        with self.reader() as ledger:
            if ledger is None or not self.ledger:
                return {}
            return {
                lease["name"].removeprefix("intake:"): lease["node"]
                for lease in ledger.leases()
                if lease["live"] and lease["name"].startswith("intake:")
            }

    def studies_json(self) -> list[dict[str, Any]]:
        """``python main.py studies --json`` (through the first node's config)."""
        done = subprocess.run(
            [sys.executable, "main.py", "--config", str(self.nodes[0].config), "studies", "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        )
        assert done.returncode == 0, done.stderr
        listed: list[dict[str, Any]] = json.loads(done.stdout)
        return listed

    def deliveries(self) -> Deliveries:
        """Every run with its outputs and sends, as recorded."""
        runs = self.query("SELECT run_id, gateway_id, study_uid, state, node FROM runs")
        outputs = self.query("SELECT run_id, sop_instance_uid FROM outputs")
        sends = self.query(
            "SELECT send_id, run_id, state, reason, started, opened, node FROM sends"
        )
        return Deliveries(runs, outputs, sends)


@dataclass
class Deliveries:
    runs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    sends: list[dict[str, Any]]

    def outputs_of(self, run_id: int) -> list[str]:
        return [o["sop_instance_uid"] for o in self.outputs if o["run_id"] == run_id]

    def sends_of(self, run_id: int) -> list[dict[str, Any]]:
        return [s for s in self.sends if s["run_id"] == run_id]

    def problems(
        self, received: Counter[str], interrupted_ok: Callable[[dict[str, Any]], bool]
    ) -> list[str]:
        """What breaks "each result stored once": an output stored twice, an instance
        stored that no run wrote, a run sent more than once, an output of a successful
        send not stored, an ``interrupted`` send that ``interrupted_ok`` does not allow."""
        found: list[str] = []
        written = {o["sop_instance_uid"] for o in self.outputs}
        found += [f"stored {n} times: {uid}" for uid, n in received.items() if n > 1]
        found += [f"stored, written by no run: {uid}" for uid in set(received) - written]
        for run in self.runs:
            sends = self.sends_of(run["run_id"])
            if len(sends) > 1:
                found.append(f"run {run['run_id']} sent {len(sends)} times: {sends}")
            for send in sends:
                if send["state"] == "success":
                    missing = [u for u in self.outputs_of(run["run_id"]) if not received[u]]
                    found += [f"run {run['run_id']}: {u} sent, not stored" for u in missing]
                elif send["state"] == "interrupted":
                    if not interrupted_ok(send):
                        found.append(f"run {run['run_id']}: send interrupted: {send}")
                else:
                    found.append(f"run {run['run_id']}: send {send['state']}: {send['reason']}")
        return found
