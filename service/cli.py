"""Command line: ``python main.py [serve|run|status|studies|study|reprocess|resend|receiver|models
fetch|config --show|ledger import]``.

Exit codes: 0 success; 1 processing failed; 2 bad usage or configuration; 3 (``run``) no
model applies to the input, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from service import __version__
from service.config import Config, check_roles, load_config, parse_roles, plain_http_warnings
from service.errors import ConfigError, GatewayError
from service.ledger import LedgerUnavailable, StudyState

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
#: ``resend``/``reprocess`` wait this long for the running service's answer by default.
DEFAULT_REQUEST_WAIT = 60.0
#: Seconds the service loop sleeps between engine ticks when nothing ran.
TICK_SECONDS = 0.2


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description="DICOM AI gateway: drop folders in, AI results as DICOM out."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML config (GATEWAY_* env overrides)")
    # --config is accepted after the command name too
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML config")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser(
        "serve", parents=[common], help="watch INPUT and process studies (the default)"
    )
    serve.add_argument(
        "--once",
        action="store_true",
        help="process the backlog present at start, then exit",
    )
    serve.add_argument(
        "--once-timeout", type=float, default=3600.0, help="seconds --once waits at most"
    )
    serve.add_argument(
        "--role",
        metavar="ROLES",
        default=None,
        help="what this node does: intake,run,send (default: service.roles, all three);"
        " anything but all three needs a PostgreSQL ledger",
    )

    run = sub.add_parser(
        "run", parents=[common], help="one-shot container contract: dicom-in dicom-out [series]"
    )
    run.add_argument("dicom_in", type=Path)
    run.add_argument("dicom_out", type=Path)
    run.add_argument("series_uid", nargs="?", default=None)
    run.add_argument("--model", help="model name (default: chosen by the routing rules)")

    status = sub.add_parser("status", parents=[common], help="studies by state per gateway")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--health", action="store_true", help="exit 0 only if the service loop is alive"
    )

    studies_cmd = sub.add_parser(
        "studies", parents=[common], help="one line per study: state, reason, updated time"
    )
    studies_cmd.add_argument("--gateway", metavar="ID", help="only this gateway's studies")
    studies_cmd.add_argument(
        "--state",
        choices=[str(s) for s in StudyState],
        help="only studies in this state",
    )
    studies_cmd.add_argument("--json", action="store_true", help="machine-readable output")

    study_cmd = sub.add_parser(
        "study", parents=[common], help="one study's history: files, runs, outputs, sends"
    )
    study_cmd.add_argument("gateway_id")
    study_cmd.add_argument("study_uid")
    study_cmd.add_argument("--json", action="store_true", help="machine-readable output")

    for name, text in (
        ("reprocess", "ask the running service to run a study again (new output series)"),
        ("resend", "ask the running service for one new send of a study's latest results"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("gateway_id")
        cmd.add_argument("study_uid")
        cmd.add_argument(
            "--wait",
            type=_seconds,
            default=DEFAULT_REQUEST_WAIT,
            metavar="SECONDS",
            help=f"how long to wait for the service's answer (default {DEFAULT_REQUEST_WAIT:g})",
        )
        cmd.add_argument(
            "--queue",
            action="store_true",
            help="when no service takes the request in time, leave it queued for the next"
            " start instead of withdrawing it (the exit code is still 1)",
        )

    receiver = sub.add_parser(
        "receiver", parents=[common], help="development storage SCP (not for production)"
    )
    receiver.add_argument("--port", type=int, required=True)
    receiver.add_argument("--dir", type=Path, required=True)
    receiver.add_argument("--ae-title", default="DEVRECEIVER")
    receiver.add_argument("--host", default="127.0.0.1")

    config_cmd = sub.add_parser(
        "config", parents=[common], help="the effective configuration per gateway"
    )
    config_cmd.add_argument(
        "--show",
        action="store_true",
        required=True,
        help="print every value per gateway with its source (file, env, default)",
    )
    config_cmd.add_argument("--json", action="store_true", help="machine-readable output")

    ledger = sub.add_parser("ledger", parents=[common], help="the ledger itself")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    ledger_import = ledger_sub.add_parser(
        "import",
        parents=[common],
        help="copy a stopped service's SQLite ledger into the configured, empty PostgreSQL one",
    )
    ledger_import.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        type=Path,
        required=True,
        help="the old service's STATE/ledger.sqlite3",
    )

    models = sub.add_parser("models", parents=[common], help="model weights")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser(
        "fetch",
        parents=[common],
        help="download the CXR weights (needs internet) and export them to ONNX",
    )
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":  # one line per association from our sender is enough
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def show_config(config: Config, *, as_json: bool) -> int:
    """``config --show``: the configured gateways, those found in INPUT and ``*``."""
    from service.config import effective_settings, render_settings
    from service.watcher import gateway_id_from_folder

    found: list[str] = []
    with contextlib.suppress(OSError):
        found = [
            gateway_id
            for entry in config.input_dir.iterdir()
            if entry.is_dir() and (gateway_id := gateway_id_from_folder(entry.name))
        ]
    settings = effective_settings(config, found)
    print(json.dumps(settings, indent=2) if as_json else render_settings(settings), end="")
    if as_json:
        print()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level)
    for warning in config.warnings:
        logger.warning("configuration: %s", warning)
    try:
        if command == "serve":
            if getattr(args, "role", None) is not None:
                config = dataclasses.replace(config, roles=parse_roles(args.role, "--role"))
                check_roles(config, "--role")
            return serve(
                config,
                once=getattr(args, "once", False),
                timeout=getattr(args, "once_timeout", 3600.0),
            )
        if command == "run":
            return run_once(config, args.dicom_in, args.dicom_out, args.series_uid, args.model)
        if command == "status":
            return status(config, as_json=args.json, health=args.health)
        if command == "studies":
            return studies(config, gateway_id=args.gateway, state=args.state, as_json=args.json)
        if command == "study":
            return study(config, args.gateway_id, args.study_uid, as_json=args.json)
        if command in ("reprocess", "resend"):
            return request(
                config, command, args.gateway_id, args.study_uid, wait=args.wait, queue=args.queue
            )
        if command == "config":
            return show_config(config, as_json=args.json)
        if command == "ledger":
            return import_ledger(config, args.source)
        if command == "receiver":
            from devtools.receiver import serve_receiver

            serve_receiver(args.port, args.dir, args.ae_title, args.host)
            return EXIT_OK
        if command == "models":
            from service.models.cxr import fetch_weights, prepare_export

            path = fetch_weights(config.cxr)
            print(f"weights ready: {path}")
            print(prepare_export(config.cxr))
            return EXIT_OK
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: {_fatal_message(exc)}", file=sys.stderr)
        return EXIT_FAILED
    raise AssertionError(command)


# -- serve --------------------------------------------------------------------------------


def serve(config: Config, *, once: bool = False, timeout: float = 3600.0) -> int:
    """Run the service until SIGTERM/SIGINT (or, with ``once``, until the backlog is done).

    Exit 0 after a requested stop (or a drained backlog); 1 when the service could not go on
    (ledger unwritable, STATE full, another service on the same STATE), with the reason.
    """
    stop = threading.Event()
    fatal: list[BaseException] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info(
            "signal %d: taking no new studies; runs already started finish within %.0f s, "
            "open sends are aborted",
            signum,
            config.shutdown_seconds,
        )
        stop.set()

    def on_fatal(exc: BaseException) -> None:
        if not fatal:
            fatal.append(exc)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)  # first: a stop during start-up is a stop too
    signal.signal(signal.SIGINT, on_signal)
    from service.console import Console
    from service.engine import Engine
    from service.fsutil import MountProbe
    from service.models import build_models
    from service.notify import Notifier, ledger_recorder
    from service.supervision import AlreadyServing, Heartbeat, InstanceLock
    from service.watcher import StudyWatcher

    engines: list[Engine] = []  # the notifier records its outcomes in the engine's ledger
    notifier = Notifier(config.notify, ledger_recorder(lambda t: engines[0].ledger.apply(t)))
    notifier.start()
    try:
        for folder in (config.input_dir, config.output_dir, config.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        lock = InstanceLock(config.state_dir)
        lock.acquire()  # AlreadyServing (a GatewayError): exit 1 with the reason
        engine = Engine(config, build_models(config, load="run" in config.roles))
    except (AlreadyServing, ConfigError):
        notifier.close(1.0)
        raise
    except (GatewayError, OSError) as exc:  # STATE or the ledger cannot be written
        notifier.notify_fatal(_fatal_message(exc))
        notifier.close(config.notify.timeout_seconds + 1.0)
        raise
    engines.append(engine)
    watcher: StudyWatcher | None = None
    probes = {"INPUT": MountProbe(config.input_dir), "OUTPUT": MountProbe(config.output_dir)}

    def unreachable() -> dict[str, str]:
        found = {name: why for name, probe in probes.items() if (why := probe.check())}
        if "INPUT" not in found and watcher is not None and watcher.unreachable:
            found["INPUT"] = watcher.unreachable
        return found

    heartbeat = Heartbeat(config.state_dir, engine.queue, on_fatal, unreachable)
    engine.ledger.observers.append(notifier.on_applied)
    console = Console(config, engine.queue, lambda: dict(notifier.outcomes))
    console.start()  # a port in use: a warning naming it, the service runs on
    try:
        engine.recover()
        engine.start()
        if "intake" in config.roles:  # a node without intake neither watches nor scans
            watcher = StudyWatcher(
                config.input_dir,
                engine.touch,
                mode=config.watch,
                rescan_seconds=config.rescan_seconds,
                poll_seconds=config.poll_seconds,
                finished_seconds=config.finished_poll_seconds,
                is_pending=engine.is_pending,
            )
            engine.on_intake_taken = lambda _gateways: watcher.scan() if watcher else None
        engine.discover()
        if watcher is not None:
            watcher.scan()
        logger.info(
            "serving input=%s output=%s watch=%s gateways=%s roles=%s",
            config.input_dir,
            config.output_dir,
            config.watch if watcher is not None else "none",
            ",".join(engine.discover()) or "none yet",
            ",".join(config.roles),
        )
        if config.workers == 0:
            logger.warning(
                "workers = 0: every stage runs in the service process; the bounds on a run "
                "(worker_memory_mb, run_timeout_seconds) need workers >= 1"
            )
        for warning in plain_http_warnings(config):
            logger.warning("destination: %s", warning)
        heartbeat.start()
        if once:
            drained = engine.drain(timeout, stop=stop)
            heartbeat.stop()
            notifier.close(config.notify.timeout_seconds + 1.0)
            console.stop()
            engine.close()
            return EXIT_OK if drained else EXIT_FAILED

        # a shared ledger: the node's heartbeat from its own thread, while the loop turns
        engine.start_node_beat(heartbeat.loop_age)

        def loop() -> None:
            try:
                last_discover = time.monotonic()
                while not stop.is_set():
                    ran = engine.tick()
                    heartbeat.turned()
                    if time.monotonic() - last_discover >= config.rescan_seconds:
                        engine.discover()
                        last_discover = time.monotonic()
                    if not ran:  # after a run, tick again at once: other studies may be due
                        engine.wait(TICK_SECONDS, stop)
                engine.finish_in_flight(max(1.0, config.shutdown_seconds - 2.0))
            except BaseException as exc:  # the loop cannot go on: the service stops
                on_fatal(exc)

        if watcher is not None:
            watcher.start()
        worker = threading.Thread(target=loop, name="engine", daemon=True)
        worker.start()
        while worker.is_alive() and not stop.is_set():
            stop.wait(1.0)
        if watcher is not None:
            watcher.stop()
        worker.join(config.shutdown_seconds)
    except BaseException as exc:
        on_fatal(exc)
        worker = None
    if fatal:
        reason = _fatal_message(fatal[0])
        logger.critical("the service cannot go on: %s", reason, exc_info=fatal[0])
        heartbeat.stop(fatal=reason)
        if isinstance(fatal[0], LedgerUnavailable):  # the open sends end, kept in STATE
            try:
                engine.outbox.journal(config.state_dir, max(1.0, config.shutdown_seconds - 2.0))
            except Exception:
                logger.exception("the send journal could not be written")
        notifier.notify_fatal(reason)
        notifier.close(config.notify.timeout_seconds + 1.0)
        console.stop()
        with contextlib.suppress(Exception):
            engine.close()
        print(f"error: the service stopped: {reason}", file=sys.stderr)
        return EXIT_FAILED
    heartbeat.stop()
    notifier.close(config.notify.timeout_seconds + 1.0)
    console.stop()
    if worker is not None and worker.is_alive():
        logger.warning(
            "runs did not finish within %.0f s; they resume at the next start",
            config.shutdown_seconds,
        )
        return EXIT_OK
    engine.close()
    lock.release()
    logger.info("stopped")
    return EXIT_OK


def _fatal_message(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return (
            f"{exc.strerror or exc}{where}: check that STATE and OUTPUT have space and are "
            "writable by the service, then restart it"
        )
    return f"unexpected {type(exc).__name__}: {exc}"


# -- run (container contract) --------------------------------------------------------------


def run_once(
    config: Config,
    dicom_in: Path,
    dicom_out: Path,
    series_uid: str | None,
    model_name: str | None,
) -> int:
    """The one-shot container contract through the service's stages (:mod:`service.oneshot`):
    the summary with real numbers on stdout; the files not used with their reasons and
    what went wrong on stderr; the exit code."""
    from service.oneshot import run_oneshot

    report = run_oneshot(config, dicom_in, dicom_out, series_uid, model_name)
    for line in report.details():
        print(line, file=sys.stderr)
    if report.summary:
        print(report.summary)
    if report.message:
        print(report.message, file=sys.stderr)
    return report.code


# -- status, studies, study: read the ledger read-only ---------------------------------------


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def status(config: Config, *, as_json: bool, health: bool) -> int:
    """Per gateway: studies by state, oldest waiting study, last errors, latest findings."""
    if health:
        from service.supervision import health as check_health

        verdict = check_health(config.state_dir)
        print(verdict.message)
        return EXIT_OK if verdict.ok else EXIT_FAILED
    from service.views import SERVICE_NOT_RUN, no_ledger, status_report

    report = status_report(config)
    if as_json:
        _print_json(report)
        return EXIT_OK
    if report["service"] == SERVICE_NOT_RUN:
        print(no_ledger(config))
        return EXIT_OK
    for gid, info in sorted(report["gateways"].items()):
        states = ", ".join(f"{k}={v}" for k, v in sorted(info["studies"].items())) or "none"
        print(f"gateway {gid}: {states}")
        if info["oldest_waiting"]:
            w = info["oldest_waiting"]
            print(f"  oldest waiting: {w['study_uid']} ({w['state']}, {w['age_s']:.0f} s)")
        for run in info["latest_runs"]:
            top = ", ".join(f"{k} {v:.2f}" for k, v in run["top_findings"])
            print(
                f"  run {run['run_id']} {run['study_uid']} {run['model']} {run['state']}"
                + (f" [{top}]" if top else "")
                + (f" {run['reason']}" if run["reason"] else "")
            )
        for err in info["last_errors"]:
            print(f"  {err['level']}: {err['study_uid']} {err['message']}")
    for node in report.get("nodes", []):  # a PostgreSQL ledger shared by nodes
        leases = ", ".join(node["leases"]) or "no leases"
        print(
            f"node {node['node']}: {','.join(node['roles'])}; heartbeat"
            f" {node['age_s']:.0f} s ago; {leases}"
        )
    return EXIT_OK


def studies(config: Config, *, gateway_id: str | None, state: str | None, as_json: bool) -> int:
    """One line (or JSON object) per study: gateway, StudyInstanceUID, state, reason, updated
    time and the node that ran its latest run (:func:`service.views.list_studies`)."""
    from service.views import NotFound, list_studies, no_ledger

    try:
        listed = list_studies(config, gateway_id, state)
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        _print_json(listed)
        return EXIT_OK
    if not listed and not config.ledger and not config.ledger_path.is_file():
        print(no_ledger(config))
        return EXIT_OK
    for s in listed:
        print(
            f"{s['gateway_id']} {s['study_uid']} {s['state']} {s['updated_at']}"
            + (f" node={s['node']}" if s["node"] else "")
            + (f" {s['reason']}" if s["reason"] else "")
        )
    if not listed:
        print("no studies" + (f" in state {state}" if state else ""))
    return EXIT_OK


def study(config: Config, gateway_id: str, study_uid: str, *, as_json: bool) -> int:
    """One study's history: state, files accepted/rejected, runs, outputs, sends, events."""
    from service.views import NotFound, study_history

    try:
        history = study_history(config, gateway_id, study_uid)
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        _print_json(history)
    else:
        _print_history(history)
    return EXIT_OK


def _timing(key: str, value: object) -> str:
    """A run timing: ``*_at`` keys are epoch times, ``*_s`` durations in seconds, the
    others counts (``batch``, ``parts``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if key.endswith("_at"):
            from service.views import iso

            return f"{key} {iso(value)}"
        if key.endswith("_s"):
            return f"{key} {value:.3f} s"
        return f"{key} {value:g}"
    return f"{key} {value}"


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _print_history(h: dict[str, Any]) -> None:
    from service.views import top_findings

    print(
        f"gateway {h['gateway_id']} study {h['study_uid']}: {h['state']}"
        + (f" ({h['reason']})" if h["reason"] else "")
    )
    print(f"  first seen {h['first_seen']}, updated {h['updated_at']}")
    files = h["files"]
    accepted = [f for f in files if f["state"] == "ok"]
    rejected = [f for f in files if f["state"] != "ok"]
    print(f"files: {len(accepted)} accepted, {len(rejected)} rejected")
    for f in accepted:
        print(f"  ok {f['path']} ({f['size']} bytes)")
    for f in rejected:
        print(f"  rejected {f['path']}: {f['reason']}")
    print(f"runs: {len(h['runs'])}")
    for run in h["runs"]:
        print(
            f"  run {run['run_id']} {run['model_name']} {run['model_version']}:"
            f" {run['state']}"
            + (f" ({run['reason']})" if run["reason"] else "")
            + f"; {run['n_inputs']} input(s), generation {run['generation']}"
            + (f", node {run['node']}" if run["node"] else "")
        )
        print(f"    started {run['started']}, finished {run['finished'] or '-'}")
        if run["timings"]:
            timings = ", ".join(_timing(k, v) for k, v in sorted(run["timings"].items()))
            print(f"    timings: {timings}")
        top = top_findings(run["findings"])
        if top:
            print("    top findings: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
        for out in run["outputs"]:
            print(
                f"    output {out['path']} {_sop_class_name(out['sop_class_uid'])}"
                f" {out['sop_instance_uid']}"
            )
        for send in run["sends"]:
            print(
                f"    send {send['send_id']} to {send['destination']}"
                + (" (manual)" if send["manual"] else "")
                + f": {send['state']}"
                + (f" ({send['reason']})" if send["reason"] else "")
                + f", started {send['started']}, finished {send['finished'] or '-'}"
            )
            for item in send["items"]:
                line = f"      {item['sop_instance_uid']} {item['status']} {item['status_text']}"
                print(line.rstrip())
    print(f"events: {len(h['events'])}")
    for event in h["events"]:
        print(f"  {event['ts']} {event['level']} {event['message']}")


# -- ledger import: from SQLite to PostgreSQL ---------------------------------------------


def import_ledger(config: Config, source: Path) -> int:
    """``ledger import --from FILE``: the SQLite ledger ``source`` copied into the configured
    PostgreSQL ledger (:meth:`~service.ledger.Ledger.import_sqlite`); the rows copied per
    table. Exit 0; 2 when refused (one line: why); 1 when a ledger cannot be used."""
    from service.ledger import ImportRefused, Ledger
    from service.supervision import is_served

    if not config.ledger:
        print(
            f"error: the configured ledger {config.ledger_shown} is not PostgreSQL: set"
            " [service] ledger (GATEWAY_LEDGER) to the postgresql:// URL to import into",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if is_served(source.parent):
        print(
            f"error: a service is serving {source.parent} now: stop it (SIGTERM), then import",
            file=sys.stderr,
        )
        return EXIT_USAGE
    target = Ledger(config.ledger, config.node_name)
    try:
        counts = target.import_sqlite(source)
    except ImportRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        target.close()
    print(f"imported {source} into {target.description}:")
    for table, n in counts.items():
        print(f"  {table} {n}")
    return EXIT_OK


# -- reprocess, resend: requests carried out by the running service --------------------------


def request(
    config: Config, kind: str, gateway_id: str, study_uid: str, *, wait: float, queue: bool
) -> int:
    """Ask the running service to ``resend`` or ``reprocess`` a study; print its answer
    (:func:`service.views.request_action`, which the console's actions use too).

    Exit 0 only when the service carried the request out successfully; 1 when it failed,
    when the gateway or study is unknown (checked read-only before anything is written),
    or when no answer came within ``wait`` seconds (then the request is withdrawn unless
    ``queue``, or the service took it and may still carry it out); 2 for a malformed id.
    """
    from service.views import request_action

    outcome = request_action(config, kind, gateway_id, study_uid, wait=wait, queue=queue)
    print(outcome.message, file=sys.stdout if outcome.answered else sys.stderr)
    return outcome.code
