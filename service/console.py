"""The operator console: dashboard, JSON API, guarded actions, ``/metrics`` and ``/healthz``,
served by the ``serve`` process on ``[service] http`` (Starlette under uvicorn, in a
thread of its own).

It only reads: the ledger through :mod:`service.views` (read-only connections, the same
views as the CLI's ``status``/``studies``/``study``), the heartbeat through
:func:`service.supervision.health`, and the output files the ledger lists (thumbnails). Its
actions (``resend``, ``reprocess``) are the CLI's requests (:func:`service.views.
request_action`), carried out by the engine. Nothing it does waits on the engine's thread,
so it never blocks intake, runs or sends.

Routes::

    GET  /                                          dashboard (HTML)
    GET  /studies/{gateway_id}/{study_uid}          a study's page (HTML)
    GET  /thumbs/{gateway_id}/{study_uid}/{sop}.png a summary image's thumbnail
    GET  /api/studies?gateway=&state=               ``studies --json``
    GET  /api/studies/{gateway_id}/{study_uid}      ``study --json``
    POST /api/studies/{gateway_id}/{study_uid}/resend | reprocess   Bearer token
    GET  /metrics                                   Prometheus text format
    GET  /healthz                                   200 healthy, 503 not
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import html
import io
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service import views
from service.config import Config, split_listen
from service.ledger import Ledger
from service.supervision import HEARTBEAT_NAME, health
from service.values import SENT_OK, RunState, SendState, StudyState

logger = logging.getLogger(__name__)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
THUMBNAIL_PIXELS = 320
#: Seconds between the dashboard's reloads of itself.
DASHBOARD_REFRESH = 30
#: Recent studies shown per gateway on the dashboard.
RECENT_STUDIES = 25
#: Seconds an action waits for the service's answer unless ``?wait=`` says otherwise
#: (the CLI's default).
ACTION_WAIT = 60.0
#: Histogram buckets (seconds): quiet period to sent, and the model's forward.
SENT_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
FORWARD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Sends that may still end (``/metrics`` reads them again at the next scrape).
OPEN_SENDS = frozenset({SendState.QUEUED, SendState.SENDING})
#: Seconds an id below the highest seen is looked for (a transaction that took it and has
#: not committed yet), and at most how many such ids are (a larger jump: ids never used).
GAP_SECONDS = 600.0
MAX_GAPS = 10_000

#: What the engine publishes (the heartbeat's numbers): studies pending, runs, sends.
QueueFn = Callable[[], dict[str, int]]


# -- metrics ---------------------------------------------------------------------------------


class Histogram:
    """One histogram family's buckets, counts and sums per label set, kept in the process:
    values are added (and taken back) one at a time. Sums are exact (a :class:`Fraction` of
    the floats), so the text is the same whatever the order the values came in."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        #: per label set: how many values are <= each bucket, then the count of all
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], Fraction] = {}

    def add(self, key: tuple[str, ...], value: float, sign: int = 1) -> None:
        """Count ``value`` under ``key`` (``sign=-1``: take back one counted before)."""
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += sign
        counts[-1] += sign
        self.sums[key] = self.sums.get(key, Fraction(0)) + sign * Fraction(value)

    def plus(self, extra: Iterable[tuple[tuple[str, ...], float]]) -> Histogram:
        """A copy with the values ``extra`` added."""
        copy = Histogram(self.buckets)
        copy.counts = {key: list(counts) for key, counts in self.counts.items()}
        copy.sums = dict(self.sums)
        for key, value in extra:
            copy.add(key, value)
        return copy

    def family(self, name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=labels)
        for key, counts in sorted(self.counts.items()):
            pairs = [(str(b), float(n)) for b, n in zip(self.buckets, counts, strict=False)]
            pairs.append(("+Inf", float(counts[-1])))
            family.add_metric(list(key), pairs, float(self.sums[key]))
        return family


def forward_value(run: dict[str, Any]) -> float | None:
    """The model forward time a run adds to ``gateway_model_forward_seconds``."""
    t = run["timings"]
    value = t.get("forward_s", t.get("model_s"))  # model_s: a model run whole
    return value if isinstance(value, int | float) else None


def sent_value(timings: dict[str, Any], sent_at: float | None) -> float | None:
    """What a run adds to ``gateway_quiet_to_sent_seconds``: its first successful send's
    end less the end of its study's quiet period."""
    stable_at = timings.get("stable_at")
    if sent_at is None or not isinstance(stable_at, int | float):
        return None
    return float(sent_at - stable_at)


class Cursor:
    """How far one table's rows (by their increasing id) have been folded in: every id up
    to :attr:`last` except those in :attr:`pending` — rows still open (a run ``running``, a
    send ``queued`` or ``sending``) to read again, and ids not seen yet below the highest
    seen (PostgreSQL: a transaction that took its id earlier may commit later), looked for
    until :data:`GAP_SECONDS` have passed (an id a rolled-back transaction took never
    comes)."""

    def __init__(self) -> None:
        self.last = 0
        self.pending: dict[int, float] = {}  # id -> until when to read it again

    def folded(self, row_id: int) -> bool:
        return row_id <= self.last and row_id not in self.pending

    def advance(self, seen: Iterable[int], still_open: Iterable[int], now: float) -> None:
        """After a read that returned the ids ``seen``, of which ``still_open`` are open."""
        seen = set(seen)
        # ids looked for and still not there, until their time is up (a row seen open and
        # read again is in ``seen``: the ledger deletes no run and no send)
        pending = {
            i: until
            for i, until in self.pending.items()
            if i not in seen and until != math.inf and until > now
        }
        pending.update(dict.fromkeys(still_open, math.inf))
        top = max(seen, default=self.last)
        if top > self.last and top - self.last - 1 <= MAX_GAPS:
            until = now + GAP_SECONDS
            pending.update((i, until) for i in range(self.last + 1, top) if i not in seen)
        self.last = max(self.last, top)
        self.pending = pending


class RunMetrics:
    """The two histograms over the runs, kept in the process and brought up to date at each
    scrape from what changed since the last one (:meth:`Ledger.metric_runs`,
    :meth:`Ledger.metric_sends`): a run's forward time is folded in once it is no longer
    ``running`` (until then it is added to each scrape's figures but not kept), its quiet-to-
    sent time once one of its sends ended ``success`` or ``warning``; a later successful
    send that ended earlier (another node's clock) replaces it. A new process starts at
    id 0 and reads the history once."""

    def __init__(self) -> None:
        self.forward = Histogram(FORWARD_BUCKETS)
        self.sent = Histogram(SENT_BUCKETS)
        self.runs = Cursor()
        self.sends = Cursor()
        #: forward times of the runs still ``running`` (shown, not folded in)
        self.open_forward: dict[int, tuple[tuple[str, ...], float]] = {}
        self.lock = threading.Lock()

    def update(self, ledger: Ledger, now: float | None = None) -> tuple[Histogram, Histogram]:
        """Read what is new in ``ledger``, fold it in; the (forward, sent) histograms."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self._runs(ledger, now)
            self._sends(ledger, now)
            return self.forward.plus(self.open_forward.values()), self.sent

    def _runs(self, ledger: Ledger, now: float) -> None:
        rows = ledger.metric_runs(self.runs.last, self.runs.pending)
        still_open = []
        for run in rows:
            value = forward_value(run)
            key = (run["gateway_id"], run["model_name"])
            self.open_forward.pop(run["run_id"], None)
            if run["state"] == RunState.RUNNING:
                still_open.append(run["run_id"])
                if value is not None:
                    self.open_forward[run["run_id"]] = (key, value)
            elif value is not None:
                self.forward.add(key, value)
        self.runs.advance((r["run_id"] for r in rows), still_open, now)

    def _sends(self, ledger: Ledger, now: float) -> None:
        rows = ledger.metric_sends(self.sends.last, self.sends.pending)
        ended_ok: dict[int, float] = {}  # run_id -> earliest end of its newly ended sends
        for send in rows:
            if send["state"] in SENT_OK and send["finished"] is not None:
                run_id, finished = send["run_id"], float(send["finished"])
                ended_ok[run_id] = min(finished, ended_ok.get(run_id, finished))
        if ended_ok:
            before: dict[int, float] = {}  # the earliest end among the sends folded in
            for send in ledger.sends_of_runs(ended_ok):
                if (
                    send["state"] in SENT_OK
                    and send["finished"] is not None
                    and self.sends.folded(send["send_id"])
                ):
                    run_id, finished = send["run_id"], float(send["finished"])
                    before[run_id] = min(finished, before.get(run_id, finished))
            for run in ledger.metric_runs(None, ended_ok):
                run_id, key = run["run_id"], (run["gateway_id"],)
                old = before.get(run_id)
                new = ended_ok[run_id] if old is None else min(old, ended_ok[run_id])
                if old is not None and new == old:
                    continue
                if (value := sent_value(run["timings"], old)) is not None:
                    self.sent.add(key, value, -1)
                if (value := sent_value(run["timings"], new)) is not None:
                    self.sent.add(key, value)
        still_open = [s["send_id"] for s in rows if s["state"] in OPEN_SENDS]
        self.sends.advance((s["send_id"] for s in rows), still_open, now)


class LedgerCollector(Collector):
    """Reads the ledger (read-only) and the heartbeat at each scrape: the numbers survive
    restarts and are the ones ``status`` shows. The counts per state are the ledger's
    ``GROUP BY`` counts; the histograms are kept by :class:`RunMetrics`, which reads only
    what changed since the previous scrape."""

    def __init__(
        self, config: Config, queue: QueueFn | None, notified: Callable[[], dict[str, int]] | None
    ) -> None:
        self.config = config
        self.queue = queue
        self.notified = notified
        self.runs = RunMetrics()

    def collect(self) -> Iterable[Metric]:
        verdict = health(self.config.state_dir)
        up = GaugeMetricFamily("gateway_healthy", "1 while the service loop beats (as /healthz)")
        up.add_metric([], 1.0 if verdict.ok else 0.0)
        yield up
        beat = GaugeMetricFamily(
            "gateway_last_heartbeat_timestamp_seconds", "when STATE/heartbeat was last written"
        )
        with contextlib.suppress(OSError):
            beat.add_metric([], (self.config.state_dir / HEARTBEAT_NAME).stat().st_mtime)
        yield beat
        if self.queue is not None:
            depth = GaugeMetricFamily(
                "gateway_queue_depth",
                "studies pending, runs in the pipeline, sends queued or open",
                labels=["queue"],
            )
            for name, value in sorted(self.queue().items()):
                depth.add_metric([name], float(value))
            yield depth
        if self.notified is not None:
            notes = GaugeMetricFamily(
                "gateway_notifications",
                "webhook notifications since start, by outcome",
                labels=["outcome"],
            )
            for name, value in sorted(self.notified().items()):
                notes.add_metric([name], float(value))
            yield notes
        ledger = Ledger.open_readonly(self.config.ledger_location)
        if ledger is None:
            return
        try:
            counts = ledger.state_counts()
            forward, sent = self.runs.update(ledger)
        finally:
            ledger.close()
        yield from count_families(counts)
        yield from histogram_families(forward, sent)


def count_families(counts: dict[str, list[tuple[str, str, int]]]) -> Iterator[Metric]:
    for table, label, doc in (
        ("studies", "state", "studies by gateway and state"),
        ("runs", "outcome", "runs by gateway and outcome (the run's state)"),
        ("sends", "outcome", "send attempts by gateway and outcome (the send's state)"),
    ):
        family = GaugeMetricFamily(f"gateway_{table}", doc, labels=["gateway", label])
        for gid, state, n in counts[table]:
            family.add_metric([gid, state], float(n))
        yield family


def histogram_families(forward: Histogram, sent: Histogram) -> Iterator[Metric]:
    yield sent.family(
        "gateway_quiet_to_sent_seconds",
        "from the end of a study's quiet period to its results' successful send",
        ["gateway"],
    )
    yield forward.family(
        "gateway_model_forward_seconds",
        "model forward time per run (the batch it ran in; a per-instance model's whole run)",
        ["gateway", "model"],
    )


def full_histograms(ledger: Ledger) -> tuple[Histogram, Histogram]:
    """The (forward, sent) histograms from every run at once (:meth:`Ledger.run_timings`,
    the whole history): what :class:`RunMetrics` must equal; tests and the bench compare."""
    forward, sent = Histogram(FORWARD_BUCKETS), Histogram(SENT_BUCKETS)
    for run in ledger.run_timings():
        if (value := forward_value(run)) is not None:
            forward.add((run["gateway_id"], run["model_name"]), value)
        if (value := sent_value(run["timings"], run["sent_at"])) is not None:
            sent.add((run["gateway_id"],), value)
    return forward, sent


# -- HTML --------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{text-align:left;padding:.25em .5em;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f4f4f4}.uid{font-family:monospace;font-size:12px}
.state{display:inline-block;padding:0 .4em;border-radius:3px;background:#e8e8e8}
.failed,.send_failed,.interrupted{background:#f8c9c4}.sent,.success{background:#cdeccd}
.waiting,.waiting_model,.receiving,.ready{background:#fbe7b5}
.thumb{max-width:320px;border:1px solid #ccc;margin:.3em}
button{font:inherit;padding:.2em .8em;margin-right:.5em}#answer{font-weight:bold}
"""

ACTION_SCRIPT = """
async function act(kind, gid, suid) {
  let token = sessionStorage.getItem('gateway-token');
  if (!token) {
    token = window.prompt('Console token (http_token)');
    if (!token) return;
    sessionStorage.setItem('gateway-token', token);
  }
  const answer = document.getElementById('answer');
  answer.textContent = kind + ' requested, waiting for the service...';
  const url = '/api/studies/' + encodeURIComponent(gid) + '/' + encodeURIComponent(suid)
    + '/' + kind;
  const response = await fetch(
    url, {method: 'POST', headers: {'Authorization': 'Bearer ' + token}});
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem('gateway-token');
  }
  const body = await response.json();
  answer.textContent = body.message || (response.status + '');
  answer.dataset.ok = body.ok ? 'true' : 'false';
  if (response.ok) setTimeout(() => window.location.reload(), 1500);
}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _state(state: str) -> str:
    return f'<span class="state {_e(state)}">{_e(state)}</span>'


def _page(
    title: str, body: str, script: str = "", status: int = 200, refresh: int = 0
) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        + (f'<meta http-equiv=refresh content="{refresh}">' if refresh else "")
        + '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f'<p><a href="/">Dashboard</a> · <a href="/api/studies">API</a> · '
        f'<a href="/metrics">metrics</a> · <a href="/healthz">health</a></p>{body}'
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>",
        status,
    )


def _study_link(gid: str, suid: str) -> str:
    return f'<a class=uid href="/studies/{quote(gid)}/{quote(suid)}">{_e(suid)}</a>'


def _timings(timings: dict[str, Any]) -> str:
    parts = []
    for key in ("prepare_s", "forward_s", "write_s", "gate_s"):
        value = timings.get(key)
        if isinstance(value, int | float):
            parts.append(f"{key[:-2]} {value:.2f} s")
    return ", ".join(parts)


def _sort_key(study: dict[str, Any]) -> tuple[int, str]:
    """Failures and interrupted sends first, then the most recently changed."""
    attention = study["state"] in views.ATTENTION_STATES
    return (0 if attention else 1, "" if study["updated_at"] is None else _neg(study["updated_at"]))


def _neg(text: str) -> str:
    """An ISO time that sorts newest first."""
    return "".join(chr(0x10FFFF - ord(c)) for c in text)


class Console:
    """The console's Starlette app and the uvicorn server that runs it in a thread."""

    def __init__(
        self,
        config: Config,
        queue: QueueFn | None = None,
        notified: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LedgerCollector(config, queue, notified))
        self.app = Starlette(
            routes=[
                Route("/", self.dashboard),
                Route("/studies/{gateway_id}/{study_uid}", self.study_page),
                Route("/thumbs/{gateway_id}/{study_uid}/{sop_uid}.png", self.thumbnail),
                Route("/api/studies", self.api_studies),
                Route("/api/studies/{gateway_id}/{study_uid}", self.api_study),
                Route(
                    "/api/studies/{gateway_id}/{study_uid}/{kind:str}",
                    self.api_action,
                    methods=["POST"],
                ),
                Route("/metrics", self.metrics),
                Route("/healthz", self.healthz),
            ]
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> bool:
        """Listen on ``[service] http`` and serve from a thread; False (with a warning naming
        the address) when it cannot listen, e.g. the port is in use: the service runs on."""
        if not self.config.http:
            return False
        host, port = split_listen(self.config.http)
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            logger.warning(
                "console: cannot listen on %s (%s); the service runs on without the console",
                self.config.http,
                why,
            )
            return False
        self.address = sock.getsockname()[:2]
        server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
            )
        )
        self._server = server
        self._thread = threading.Thread(
            target=self._serve, args=(server, sock), name="console", daemon=True
        )
        self._thread.start()
        logger.info("console: http://%s:%d/", *self.address)
        return True

    @staticmethod
    def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException:  # the console never takes the service down
            logger.exception("console stopped")

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    # -- JSON API ---------------------------------------------------------------------------

    def api_studies(self, request: Request) -> Response:
        gid = request.query_params.get("gateway")
        state = request.query_params.get("state")
        if state is not None and state not in {str(s) for s in StudyState}:
            return JSONResponse({"error": f"unknown state {state!r}"}, 400)
        try:
            return JSONResponse(views.list_studies(self.config, gid, state))
        except views.NotFound as exc:
            return JSONResponse({"error": str(exc)}, 404)

    def api_study(self, request: Request) -> Response:
        gid, suid = request.path_params["gateway_id"], request.path_params["study_uid"]
        try:
            return JSONResponse(views.study_history(self.config, gid, suid))
        except views.NotFound as exc:
            return JSONResponse({"error": str(exc)}, 404)

    def _authorise(self, request: Request) -> Response | None:
        """None when the request carries the configured Bearer token; else the refusal
        (logged, never with the token)."""
        client = request.client.host if request.client else "?"
        if not self.config.http_token:
            return JSONResponse(
                {"ok": False, "message": "actions are disabled: no http_token is configured"},
                403,
            )
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            logger.warning(
                "console: %s %s from %s refused: no token", request.method, request.url.path, client
            )
            return JSONResponse(
                {"ok": False, "message": "Authorization: Bearer <token> required"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), self.config.http_token.encode()):
            logger.warning(
                "console: %s %s from %s refused: wrong token",
                request.method,
                request.url.path,
                client,
            )
            return JSONResponse({"ok": False, "message": "wrong token"}, 403)
        return None

    async def api_action(self, request: Request) -> Response:
        refused = self._authorise(request)
        if refused is not None:
            return refused
        kind = request.path_params["kind"]
        if kind not in ("resend", "reprocess"):
            return JSONResponse({"ok": False, "message": f"unknown action {kind!r}"}, 404)
        gid, suid = request.path_params["gateway_id"], request.path_params["study_uid"]
        try:
            wait = float(request.query_params.get("wait", ACTION_WAIT))
        except ValueError:
            return JSONResponse({"ok": False, "message": "wait: not a number"}, 400)
        logger.info("console: %s of gateway %s study %s requested", kind, gid, suid)
        outcome = await asyncio.to_thread(
            views.request_action, self.config, kind, gid, suid, wait=wait, queue=False
        )
        if outcome.answered:
            status = 200
        elif outcome.code == 2:
            status = 400
        elif outcome.state:  # no answer in time: withdrawn, or taken and still going
            status = 504
        else:
            status = 404
        return JSONResponse(
            {"ok": outcome.ok, "state": outcome.state, "message": outcome.message}, status
        )

    # -- metrics, health ------------------------------------------------------------------

    def metrics(self, _request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def healthz(self, _request: Request) -> Response:
        verdict = health(self.config.state_dir)
        return PlainTextResponse(verdict.message + "\n", 200 if verdict.ok else 503)

    # -- HTML -------------------------------------------------------------------------------

    def dashboard(self, _request: Request) -> Response:
        report = views.status_report(self.config)
        studies = views.list_studies(self.config)
        body = [
            "<h1>DICOM AI gateway</h1>",
            f'<p id=health class="{"ok" if report["healthy"] else "bad"}">'
            f"{_e(report['health'])}</p>",
        ]
        if report["service"] == views.SERVICE_NOT_RUN:
            body.append(f"<p>{_e(views.no_ledger(self.config))}</p>")
        for gid, info in sorted(report["gateways"].items()):
            counts = " ".join(
                f"{_state(state)} {n}" for state, n in sorted(info["studies"].items())
            )
            body.append(
                f'<h2 id="gateway-{_e(gid)}">Gateway {_e(gid)}</h2><p>{counts or "no studies"}</p>'
            )
            waiting = info["oldest_waiting"]
            if waiting:
                body.append(
                    f"<p>Oldest waiting: {_study_link(gid, waiting['study_uid'])} "
                    f"{_state(waiting['state'])} for {waiting['age_s']:.0f} s"
                    + (f": {_e(waiting['reason'])}" if waiting.get("reason") else "")
                    + "</p>"
                )
            mine = sorted((s for s in studies if s["gateway_id"] == gid), key=_sort_key)
            body.append(self._recent_table(gid, mine[:RECENT_STUDIES]))
        return _page("DICOM AI gateway", "".join(body), refresh=DASHBOARD_REFRESH)

    def _recent_table(self, gid: str, studies: list[dict[str, Any]]) -> str:
        rows = []
        runs = self._latest_runs(gid, [s["study_uid"] for s in studies])
        for s in studies:
            run = runs.get(s["study_uid"])
            top = (
                ", ".join(f"{_e(k)} {v:.2f}" for k, v in views.top_findings(run["findings"]))
                if run
                else ""
            )
            timing = _timings(run["timings"]) if run else ""
            send = ""
            if run and run["sends"]:
                last = run["sends"][-1]
                send = _state(last["state"])
            rows.append(
                f"<tr class=study><td>{_study_link(gid, s['study_uid'])}</td>"
                f"<td>{_state(s['state'])}</td><td>{send}</td><td>{_e(s['reason'])}</td>"
                f"<td>{_e(s['updated_at'])}</td><td>{timing}</td><td>{top}</td></tr>"
            )
        return (
            f'<table id="studies-{_e(gid)}"><tr><th>StudyInstanceUID</th><th>state</th>'
            "<th>last send</th><th>reason</th>"
            "<th>updated</th><th>timings</th><th>top findings</th></tr>"
            + "".join(rows)
            + "</table>"
        )

    def _latest_runs(self, gid: str, study_uids: list[str]) -> dict[str, dict[str, Any]]:
        ledger = Ledger.open_readonly(self.config.ledger_location)
        if ledger is None:
            return {}
        try:
            found = {}
            for suid in study_uids:
                history = ledger.study_history(gid, suid)
                if history and history["runs"]:
                    found[suid] = history["runs"][-1]
            return found
        finally:
            ledger.close()

    def study_page(self, request: Request) -> Response:
        gid, suid = request.path_params["gateway_id"], request.path_params["study_uid"]
        try:
            h = views.study_history(self.config, gid, suid)
        except views.NotFound as exc:
            return _page("not found", f"<p>{_e(exc)}</p>", status=404)
        out = [
            f"<h1>Gateway {_e(gid)} study <span class=uid>{_e(suid)}</span></h1>",
            f"<p id=study-state>{_state(h['state'])} {_e(h['reason'])}</p>",
            f"<p>first seen {_e(h['first_seen'])}, updated {_e(h['updated_at'])}</p>",
        ]
        if self.config.http_token:
            out.append(
                f"<p><button id=resend onclick=\"act('resend', {_js(gid)}, {_js(suid)})\">"
                "Resend</button>"
                f"<button id=reprocess onclick=\"act('reprocess', {_js(gid)}, {_js(suid)})\">"
                "Reprocess</button> <span id=answer></span></p>"
            )
        thumbs = [
            (run["run_id"], o)
            for run in h["runs"]
            for o in run["outputs"]
            if o["sop_class_uid"] == SECONDARY_CAPTURE
        ]
        if thumbs:
            out.append("<h2>Summary images</h2><p>")
            for run_id, o in thumbs:
                src = f"/thumbs/{quote(gid)}/{quote(suid)}/{quote(o['sop_instance_uid'])}.png"
                out.append(
                    f'<img class=thumb src="{src}" alt="summary image of run {run_id}"'
                    f' title="run {run_id}">'
                )
            out.append("</p>")
        files = h["files"]
        out.append(
            f"<h2>Files ({len(files)})</h2><table><tr><th>path</th><th>state</th>"
            "<th>reason</th><th>bytes</th></tr>"
        )
        for f in files:
            out.append(
                f"<tr><td>{_e(f['path'])}</td><td>{_state(f['state'])}</td>"
                f"<td>{_e(f['reason'])}</td><td>{_e(f['size'])}</td></tr>"
            )
        out.append("</table>")
        out.append(f"<h2>Runs ({len(h['runs'])})</h2>")
        for run in h["runs"]:
            top = ", ".join(f"{_e(k)} {v:.2f}" for k, v in views.top_findings(run["findings"]))
            out.append(
                f"<h3>Run {run['run_id']}: {_e(run['model_name'])} {_e(run['model_version'])} "
                f"{_state(run['state'])} {_e(run['reason'])}</h3>"
                f"<p>started {_e(run['started'])}, finished {_e(run['finished'] or '-')}"
                + (f"; node {_e(run['node'])}" if run["node"] else "")
                + (f"<br>timings: {_timings(run['timings'])}" if run["timings"] else "")
                + (f"<br>top findings: {top}" if top else "")
                + "</p>"
            )
            if run["outputs"]:
                out.append(
                    "<table><tr><th>output</th><th>SOP class</th><th>SOP Instance UID</th></tr>"
                )
                for o in run["outputs"]:
                    out.append(
                        f"<tr><td>{_e(Path(o['path']).name)}</td><td>{_e(_sop_name(o['sop_class_uid']))}</td>"
                        f"<td class=uid>{_e(o['sop_instance_uid'])}</td></tr>"
                    )
                out.append("</table>")
            for send in run["sends"]:
                out.append(
                    f'<div class=send id="send-{send["send_id"]}"><p>Send {send["send_id"]} to '
                    f"{_e(send['destination'])}{' (manual)' if send['manual'] else ''}: "
                    f"{_state(send['state'])} {_e(send['reason'])}; started {_e(send['started'])}, "
                    f"finished {_e(send['finished'] or '-')}</p>"
                )
                if send["items"]:
                    out.append(
                        "<table><tr><th>SOP Instance UID</th><th>outcome</th><th>status</th></tr>"
                    )
                    for item in send["items"]:
                        code = item["status_code"]
                        out.append(
                            f"<tr><td class=uid>{_e(item['sop_instance_uid'])}</td>"
                            f"<td>{_state(item['status'])}</td>"
                            f"<td>{'' if code is None else f'0x{code:04X}'}</td></tr>"
                        )
                    out.append("</table>")
                out.append("</div>")
        out.append(f"<h2>Events ({len(h['events'])})</h2><table>")
        for event in h["events"]:
            out.append(
                f"<tr><td>{_e(event['ts'])}</td><td>{_e(event['level'])}</td>"
                f"<td>{_e(event['message'])}</td></tr>"
            )
        out.append("</table>")
        return _page(f"study {suid}", "".join(out), ACTION_SCRIPT if self.config.http_token else "")

    async def thumbnail(self, request: Request) -> Response:
        gid, suid = request.path_params["gateway_id"], request.path_params["study_uid"]
        sop = request.path_params["sop_uid"]
        png = await asyncio.to_thread(self._render, gid, suid, sop)
        if png is None:
            return PlainTextResponse("no such summary image\n", 404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    def _render(self, gid: str, suid: str, sop: str) -> bytes | None:
        """A PNG of one of our own outputs (a path the ledger recorded, inside OUTPUT)."""
        recorded = views.output_path(self.config, gid, suid, sop)
        if not recorded:
            return None
        path = Path(recorded)
        if not path.resolve().is_relative_to(self.config.output_dir.resolve()):
            return None
        return render_thumbnail(path)


def _js(text: str) -> str:
    """A JavaScript string literal, safe inside an HTML attribute."""
    import json

    return html.escape(json.dumps(text), quote=True)


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def render_thumbnail(path: Path, size: int = THUMBNAIL_PIXELS) -> bytes | None:
    """The image of a DICOM file as a PNG at most ``size`` pixels wide and high (8-bit, its
    full range stretched), or None when it has no pixels we can decode."""
    import numpy as np
    import pydicom
    from PIL import Image

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # a file that vanished or does not decode: no thumbnail
        logger.warning("console: no thumbnail of %s: %s", path.name, exc)
        return None
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]
    array = pixels.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) * (255.0 / (high - low)) if high > low else array * 0
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 255.0 - scaled
    image = Image.fromarray(scaled.clip(0, 255).astype(np.uint8))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def metrics_text(config: Config) -> str:
    """``/metrics`` of ``config``'s ledger and heartbeat (without the live queue), read
    whole: a collector of its own, as at a started console's first scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(config, None, None))
    return generate_latest(registry).decode()
