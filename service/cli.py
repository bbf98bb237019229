"""Command line: ``python main.py [serve|run|status|reprocess|resend|receiver|models fetch]``.

Exit codes: 0 success; 1 processing failed; 2 bad usage or configuration; 3 (``run``) no
model applies to the input, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
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
from service.config import Config, load_config
from service.errors import ConfigError, GatewayError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
#: Seconds the service loop sleeps between engine ticks when nothing ran.
TICK_SECONDS = 0.2


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

    for name, text in (
        ("reprocess", "run a study again (picked up by the running service)"),
        ("resend", "make one new send attempt of a study's latest results"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("gateway_id")
        cmd.add_argument("study_uid")

    receiver = sub.add_parser(
        "receiver", parents=[common], help="development storage SCP (not for production)"
    )
    receiver.add_argument("--port", type=int, required=True)
    receiver.add_argument("--dir", type=Path, required=True)
    receiver.add_argument("--ae-title", default="DEVRECEIVER")
    receiver.add_argument("--host", default="127.0.0.1")

    models = sub.add_parser("models", parents=[common], help="model weights")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser(
        "fetch", parents=[common], help="download the CXR weights (needs internet)"
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level)
    try:
        if command == "serve":
            return serve(
                config,
                once=getattr(args, "once", False),
                timeout=getattr(args, "once_timeout", 3600.0),
            )
        if command == "run":
            return run_once(config, args.dicom_in, args.dicom_out, args.series_uid, args.model)
        if command == "status":
            return status(config, as_json=args.json, health=args.health)
        if command == "reprocess":
            return reprocess(config, args.gateway_id, args.study_uid)
        if command == "resend":
            return resend(config, args.gateway_id, args.study_uid)
        if command == "receiver":
            from service.receiver import serve_receiver

            serve_receiver(args.port, args.dir, args.ae_title, args.host)
            return EXIT_OK
        if command == "models":
            from service.models.cxr import fetch_weights

            path = fetch_weights(config.cxr)
            print(f"weights ready: {path}")
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
    from service.engine import Engine
    from service.models import build_models
    from service.supervision import Heartbeat, InstanceLock
    from service.watcher import StudyWatcher

    for folder in (config.input_dir, config.output_dir, config.state_dir):
        folder.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(config.state_dir)
    lock.acquire()  # AlreadyServing (a GatewayError): exit 1 with the reason
    engine = Engine(config, build_models(config))
    heartbeat = Heartbeat(config.state_dir, engine.queue, on_fatal)
    try:
        engine.recover()
        engine.start()
        watcher = StudyWatcher(
            config.input_dir,
            engine.touch,
            mode=config.watch,
            rescan_seconds=config.rescan_seconds,
            poll_seconds=config.poll_seconds,
        )
        engine.discover()
        watcher.scan()
        logger.info(
            "serving input=%s output=%s watch=%s gateways=%s",
            config.input_dir,
            config.output_dir,
            config.watch,
            ",".join(engine.discover()) or "none yet",
        )
        heartbeat.start()
        if once:
            drained = engine.drain(timeout, stop=stop)
            heartbeat.stop()
            engine.close()
            return EXIT_OK if drained else EXIT_FAILED

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

        watcher.start()
        worker = threading.Thread(target=loop, name="engine", daemon=True)
        worker.start()
        while worker.is_alive() and not stop.is_set():
            stop.wait(1.0)
        watcher.stop()
        worker.join(config.shutdown_seconds)
    except BaseException as exc:
        on_fatal(exc)
        worker = None
    if fatal:
        reason = _fatal_message(fatal[0])
        logger.critical("the service cannot go on: %s", reason, exc_info=fatal[0])
        heartbeat.stop(fatal=reason)
        with contextlib.suppress(Exception):
            engine.close()
        print(f"error: the service stopped: {reason}", file=sys.stderr)
        return EXIT_FAILED
    heartbeat.stop()
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


# -- status, reprocess, resend -------------------------------------------------------------


def status(config: Config, *, as_json: bool, health: bool) -> int:
    """Per gateway: studies by state, oldest waiting study, last errors, latest findings."""
    if health:
        from service.supervision import health as check_health

        verdict = check_health(config.state_dir)
        print(verdict.message)
        return EXIT_OK if verdict.ok else EXIT_FAILED
    if not config.ledger_path.exists():
        print(f"no ledger at {config.ledger_path}: the service has not run yet")
        return EXIT_OK
    report = status_report(config)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
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
    return EXIT_OK


def _top_findings(findings: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """Highest probabilities across images, from a model's findings summary."""
    best: dict[str, float] = {}
    for per_image in (findings.get("images") or {}).values():
        if isinstance(per_image, dict):
            for name, prob in per_image.items():
                if isinstance(prob, int | float):
                    best[name] = max(best.get(name, 0.0), float(prob))
    return sorted(best.items(), key=lambda kv: -kv[1])[:n]


def status_report(config: Config) -> dict[str, Any]:
    from service.ledger import Ledger

    ledger = Ledger(config.ledger_path)
    now = time.time()
    try:
        gateways: dict[str, Any] = {}
        ids = {r["gateway_id"] for r in ledger.query("SELECT gateway_id FROM gateways")}
        ids |= {r["gateway_id"] for r in ledger.query("SELECT DISTINCT gateway_id FROM studies")}
        for gid in sorted(ids):
            counts = {
                r["state"]: r["n"]
                for r in ledger.query(
                    "SELECT state, COUNT(*) AS n FROM studies WHERE gateway_id=? GROUP BY state",
                    (gid,),
                )
            }
            waiting = ledger.query(
                "SELECT study_uid, state, first_seen FROM studies WHERE gateway_id=? AND state IN"
                " ('receiving','waiting','waiting_model','ready') ORDER BY first_seen LIMIT 1",
                (gid,),
            )
            errors = ledger.query(
                "SELECT level, study_uid, message, ts FROM events WHERE gateway_id=?"
                " ORDER BY event_id DESC LIMIT 5",
                (gid,),
            )
            runs = ledger.runs(gid)[-5:]
            gateways[gid] = {
                "studies": counts,
                "oldest_waiting": (
                    {
                        "study_uid": waiting[0]["study_uid"],
                        "state": waiting[0]["state"],
                        "age_s": now - waiting[0]["first_seen"],
                    }
                    if waiting
                    else None
                ),
                "last_errors": [dict(e) for e in errors],
                "latest_runs": [
                    {
                        "run_id": r.run_id,
                        "study_uid": r.study_uid,
                        "model": f"{r.model_name} {r.model_version}",
                        "state": str(r.state),
                        "reason": r.reason,
                        "findings": r.findings,
                        "top_findings": _top_findings(r.findings),
                    }
                    for r in runs
                ],
            }
        return {"gateways": gateways}
    finally:
        ledger.close()


def reprocess(config: Config, gateway_id: str, study_uid: str) -> int:
    from service.engine import request_reprocess

    request_reprocess(config, gateway_id, study_uid)
    print(f"reprocess of gateway {gateway_id} study {study_uid} requested")
    return EXIT_OK


def resend(config: Config, gateway_id: str, study_uid: str) -> int:
    from service.engine import Engine

    engine = Engine(config, {})
    try:
        if not engine.resend(gateway_id, study_uid):
            print(f"error: no written results for gateway {gateway_id} study {study_uid}")
            return EXIT_FAILED
        row = engine.ledger.query(
            "SELECT state, reason FROM studies WHERE gateway_id=? AND study_uid=?",
            (gateway_id, study_uid),
        )[0]
    finally:
        engine.close()
    print(f"resend: {row['state']} {row['reason']}")
    return EXIT_OK if row["state"] == "sent" else EXIT_FAILED
