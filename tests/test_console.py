"""The operator console of a real running service: JSON API (the CLI's own views), metrics
(parsed with prometheus_client's parser), health, token checks, the webhook on a real
local HTTP server, and the dashboard in Debian's headless Chromium (screenshot saved)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from service.config import from_mapping
from service.console import Console, LedgerCollector, full_histograms, histogram_families
from service.ledger import Ledger, SendChange, Transition
from service.values import SendState
from tests.conftest import free_port, shared_file
from tests.helpers import (
    ROOT,
    copy_series,
    ledger_rows,
    ledger_run,
    ledger_send,
    ledger_written,
    run_cli,
    wait_for,
    write_config,
)
from tests.test_cxr import write_checkpoint

TOKEN = "console-test-token-4f1c"
#: With UPDATE_SCREENSHOTS=1 the browser test also writes its screenshots into docs/ (the
#: README's pictures); METRICS_EXCERPT=FILE saves the /metrics text the test parsed.
DOCS = ROOT / "docs"


class Webhook:
    """A real local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.raw.append(body)
                received.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Running:
    base: str
    config: Path
    state: Path
    log: Path
    cxr_uid: str
    ct_uid: str
    webhook: Webhook
    patient_names: list[str]


def http(
    url: str, method: str = "GET", token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, lower(exc.headers.items()), exc.read()


def lower(items: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in items}


def get_json(url: str) -> Any:
    status, _, body = http(url)
    assert status == 200, body
    return json.loads(body)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A real ``serve`` with its console: gateway 1 a chest X-ray (CXR model, summary image)
    sent to a real Storage SCP; gateway 2 a CT study (annotate) whose destination refuses
    connections: send_failed, announced to the webhook."""
    tmp = tmp_path_factory.mktemp("console")
    weights = write_checkpoint(tmp_path_factory.mktemp("weights"))
    ae = AE(ae_title="CONSOLEPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    pacs_port = free_port()
    scp = ae.start_server(
        ("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _e: 0)]
    )
    assert scp is not None
    webhook = Webhook()
    closed_port = free_port()
    http_port = free_port()
    extra = f"""
[pacs]
host = "127.0.0.1"
port = {pacs_port}
ae_title = "CONSOLEPACS"
timeout_seconds = 5
[models.cxr]
weights = "{weights}"
device = "cpu"
[notify]
webhook_url = "{webhook.url}"
timeout_seconds = 5
[gateways.2]
pacs = {{ port = {closed_port} }}
"""
    rules = '[{ model = "cxr-densenet121", modality = ["CR", "DX"] }, { model = "annotate" }]'
    config = write_config(
        tmp, extra, rules=rules, max_wait=2, http=f"127.0.0.1:{http_port}", http_token=TOKEN
    )
    staging = tmp / "staging"
    staging.mkdir()
    source = shared_file("cxr/siim-cr-pa-jpeg.dcm")
    shutil.copyfile(source, staging / source.name)
    cxr_uid, _ = copy_series(staging, tmp / "INPUT/gateway_1")
    ct_uid, ct_files = copy_series(shared_file("series/ct-4-noise"), tmp / "INPUT/gateway_2", 2)
    names = [str(dcmread(p, stop_before_pixels=True).PatientName) for p in (source, ct_files[0])]
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--config", str(config), "serve"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    base = f"http://127.0.0.1:{http_port}"
    state = tmp / "STATE"

    def settled() -> bool:
        rows = ledger_rows(state, "SELECT gateway_id, state FROM studies ORDER BY gateway_id")
        return [(r["gateway_id"], r["state"]) for r in rows] == [
            ("1", "sent"),
            ("2", "send_failed"),
        ] and any("webhook" in r["message"] for r in ledger_rows(state, "SELECT * FROM events"))

    try:
        try:
            wait_for(lambda: proc.poll() is not None or settled(), 180, "both studies to end")
        except AssertionError:
            raise AssertionError(log.read_text()) from None
        assert proc.poll() is None, log.read_text()
        yield Running(base, config, state, log, cxr_uid, ct_uid, webhook, names)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        scp.shutdown()
        webhook.close()


def test_api_studies_are_the_cli_views(running: Running) -> None:
    cli = run_cli("--config", str(running.config), "studies", "--json")
    assert get_json(f"{running.base}/api/studies") == json.loads(cli.stdout)
    cli = run_cli(
        "--config",
        str(running.config),
        "studies",
        "--json",
        "--gateway",
        "2",
        "--state",
        "send_failed",
    )
    api = get_json(f"{running.base}/api/studies?gateway=2&state=send_failed")
    assert api == json.loads(cli.stdout) and [s["study_uid"] for s in api] == [running.ct_uid]
    cli = run_cli("--config", str(running.config), "study", "1", running.cxr_uid, "--json")
    assert get_json(f"{running.base}/api/studies/1/{running.cxr_uid}") == json.loads(cli.stdout)
    status, _, body = http(f"{running.base}/api/studies/9/{running.cxr_uid}")
    assert status == 404 and b"unknown gateway 9" in body
    status, _, body = http(f"{running.base}/api/studies?gateway=1&state=nonsense")
    assert status == 400


def test_metrics_parse_and_match_the_ledger(running: Running) -> None:
    status, headers, body = http(f"{running.base}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert all(name.startswith("gateway_") for name in families)
    studies = {
        (s.labels["gateway"], s.labels["state"]): s.value
        for s in families["gateway_studies"].samples
    }
    rows = ledger_rows(
        running.state, "SELECT gateway_id, state, COUNT(*) n FROM studies GROUP BY 1, 2"
    )
    assert studies == {(r["gateway_id"], r["state"]): r["n"] for r in rows}
    sends = {
        (s.labels["gateway"], s.labels["outcome"]): s.value
        for s in families["gateway_sends"].samples
    }
    rows = ledger_rows(
        running.state,
        "SELECT r.gateway_id, s.state, COUNT(*) n FROM sends s JOIN runs r USING (run_id)"
        " GROUP BY 1, 2",
    )
    assert sends == {(r["gateway_id"], r["state"]): r["n"] for r in rows}
    assert {s.labels["gateway"] for s in families["gateway_runs"].samples} == {"1", "2"}
    sent = [
        s for s in families["gateway_quiet_to_sent_seconds"].samples if s.name.endswith("_count")
    ]
    sent_runs = ledger_rows(running.state, "SELECT COUNT(*) n FROM runs WHERE state='sent'")
    assert sum(s.value for s in sent) == sent_runs[0]["n"] >= 1
    forward = families["gateway_model_forward_seconds"].samples
    assert {(s.labels["gateway"], s.labels["model"]) for s in forward} == {
        ("1", "cxr-densenet121"),
        ("2", "annotate"),
    }
    queue = {s.labels["queue"] for s in families["gateway_queue_depth"].samples}
    assert queue == {"pending", "running", "sending"}
    assert families["gateway_healthy"].samples[0].value == 1
    beat = families["gateway_last_heartbeat_timestamp_seconds"].samples[0].value
    assert beat == pytest.approx((running.state / "heartbeat").stat().st_mtime, abs=10)
    if os.environ.get("METRICS_EXCERPT"):
        Path(os.environ["METRICS_EXCERPT"]).write_text(body.decode())


def test_healthz_while_the_loop_beats(running: Running) -> None:
    status, _, body = http(f"{running.base}/healthz")
    assert status == 200 and body.startswith(b"healthy")


def test_actions_need_the_token(running: Running) -> None:
    url = f"{running.base}/api/studies/1/{running.cxr_uid}/resend"
    status, headers, _ = http(url, "POST")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    status, _, _ = http(url, "POST", token="not-" + TOKEN)
    assert status == 403
    log = running.log.read_text()
    assert "refused: no token" in log and "refused: wrong token" in log
    assert TOKEN not in log
    before = ledger_rows(running.state, "SELECT COUNT(*) n FROM sends")[0]["n"]
    assert before == 2  # nothing was requested


def test_resend_through_the_api_is_the_cli_request(running: Running) -> None:
    ct = f"{running.base}/api/studies/2/{running.ct_uid}/resend"
    status, _, body = http(ct, "POST", token=TOKEN)
    answer = json.loads(body)
    assert status == 200 and answer["ok"] is False and answer["state"] == "send_failed"
    status, _, body = http(f"{running.base}/api/studies/2/1.2.3.4/resend", "POST", token=TOKEN)
    assert status == 404 and "nothing requested" in json.loads(body)["message"]


def shot(driver: Any, running: Running, name: str) -> None:
    """Save a screenshot beside the service's files (and into docs/ when asked)."""
    path = running.state.parent / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 0
    if os.environ.get("UPDATE_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / name)


def test_dashboard_in_chromium_shows_the_study_and_resends(running: Running) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not Path("/usr/bin/chromedriver").exists():
        pytest.fail("chromium-driver is not installed: `make test-deps` installs it")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(running.base + "/")
        first = {
            gid: driver.find_element(By.CSS_SELECTOR, f"#studies-{gid} tr.study").text
            for gid in ("1", "2")
        }
        assert running.cxr_uid in first["1"] and " sent " in first["1"]
        assert running.ct_uid in first["2"] and "send_failed" in first["2"]
        page = driver.page_source
        assert not any(name and name in page for name in running.patient_names)
        shot(driver, running, "console.png")
        driver.find_element(By.LINK_TEXT, running.cxr_uid).click()
        assert "sent" in driver.find_element(By.ID, "study-state").text
        thumbs = driver.find_elements(By.CSS_SELECTOR, "img.thumb")
        assert thumbs
        for img in thumbs:  # decoded by the browser: a real picture
            width = driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", img
            )
            assert width and int(width) > 0
        sends_before = len(driver.find_elements(By.CSS_SELECTOR, "div.send"))
        driver.find_element(By.ID, "resend").click()
        alert = WebDriverWait(driver, 10).until(lambda d: d.switch_to.alert)
        alert.send_keys(TOKEN)
        alert.accept()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.ID, "answer").get_attribute("data-ok") is not None
        )
        assert driver.find_element(By.ID, "answer").get_attribute("data-ok") == "true"
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "div.send")) == sends_before + 1
        )
        newest = driver.find_elements(By.CSS_SELECTOR, "div.send")[-1].text
        assert "(manual)" in newest and "success" in newest
        shot(driver, running, "console-study.png")
        page = driver.page_source
        assert not any(name and name in page for name in running.patient_names)
    finally:
        driver.quit()


def test_webhook_received_failure_without_patient_data(running: Running) -> None:
    # the send_failed study, once when it failed (and again for each failed resend)
    notified = {(b["gateway"], b["study_uid"], b["state"]) for b in running.webhook.bodies}
    assert notified == {("2", running.ct_uid, "send_failed")}
    body = running.webhook.bodies[0]
    assert set(body) == {"gateway", "study_uid", "state", "reason", "time"} and body["reason"]
    assert not any(
        name.encode() in raw
        for raw in running.webhook.raw
        for name in running.patient_names
        if name
    )
    events = ledger_rows(
        running.state, "SELECT message FROM events WHERE study_uid=?", (running.ct_uid,)
    )
    assert "webhook notification (send_failed) delivered: HTTP 200" in [
        e["message"] for e in events
    ]


# -- the console on its own ------------------------------------------------------------------


def console_config(tmp_path: Path, http: str, token: str = "") -> Any:
    return from_mapping(
        {"service": {"state_dir": str(tmp_path / "STATE"), "http": http, "http_token": token}}
    )


def test_port_in_use_warns_naming_it_and_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        console = Console(console_config(tmp_path, address))
        with caplog.at_level(logging.WARNING):
            assert console.start() is False
    assert any(address in r.getMessage() and "in use" in r.getMessage() for r in caplog.records)


def test_healthz_503_without_a_service_and_actions_disabled_without_token(tmp_path: Path) -> None:
    console = Console(console_config(tmp_path, "127.0.0.1:0"))
    assert console.start()
    try:
        assert console.address is not None
        base = f"http://127.0.0.1:{console.address[1]}"
        status, _, body = http(f"{base}/healthz")
        assert status == 503 and body.startswith(b"unhealthy")
        status, _, body = http(f"{base}/api/studies/1/1.2.3/resend", "POST", token="anything")
        assert status == 403 and b"no http_token" in body
        assert get_json(f"{base}/api/studies") == []
        status, _, body = http(f"{base}/")
        assert status == 200 and b"has not run yet" in body
    finally:
        console.stop()


def test_console_off_when_http_is_empty(tmp_path: Path) -> None:
    assert Console(console_config(tmp_path, "")).start() is False


# -- /metrics reads what changed since the last scrape ------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def metrics_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Ledger]]:
    """A console's config and the ledger a service writes (SQLite in STATE or PostgreSQL)."""
    service: dict[str, str] = {"state_dir": str(tmp_path / "STATE"), "http": ""}
    if request.param == "postgresql":
        service["ledger"] = request.getfixturevalue("postgres").database()
    config = from_mapping({"service": service})
    writer = Ledger(config.ledger_location)
    yield config, writer
    writer.close()


def scrape(collector: LedgerCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def histograms(text: str) -> str:
    """The histogram lines of a /metrics text."""
    return "".join(
        line + "\n"
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[-1].startswith(("gateway_quiet", "gateway_model"))
    )


def full_text(config: Any) -> str:
    """The histograms recomputed from every run at once (the old per-scrape full read)."""
    ledger = Ledger.open_readonly(config.ledger_location)
    assert ledger is not None
    try:
        forward, sent = full_histograms(ledger)
    finally:
        ledger.close()
    registry = CollectorRegistry(auto_describe=False)

    class Full(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from histogram_families(forward, sent)

    registry.register(Full())
    return generate_latest(registry).decode()


def test_metrics_after_many_runs_equal_a_full_read_and_a_restart(
    metrics_ledger: tuple[Any, Ledger],
) -> None:
    config, ledger = metrics_ledger
    collector = LedgerCollector(config, None, None)
    outcomes = ["success", "warning", "failure", "queued", "failed", "skipped", "running"]
    opened: list[tuple[str, int, int]] = []
    for batch in range(4):
        for n in range(14):
            study = f"1.2.{batch}.{n}"
            outcome = outcomes[(n + batch) % len(outcomes)]
            timings = {"stable_at": 1_700_000_000.0 + n * 0.37, "forward_s": 0.013 * n + 0.1}
            if n % 3 == 0:
                timings = {"stable_at": 1_700_000_000.0 + n, "model_s": 1.7 + n}
            gateway, model = ("2", "cxr") if n % 2 else ("1", "annotate")
            run, send = ledger_run(
                ledger, study, gateway_id=gateway, model=model, timings=timings, outcome=outcome
            )
            if outcome == "queued" and send is not None:
                opened.append((study, run, send))
        if opened and batch % 2:  # sends queued at an earlier scrape end now
            for study, run, send in opened:
                gateway = ledger.get_run(run).gateway_id  # type: ignore[union-attr]
                ledger_send(ledger, gateway, study, run, send, SendState.SUCCESS)
            opened.clear()
        text = scrape(collector)
        assert histograms(text) == histograms(full_text(config)) != ""
        assert text == scrape(LedgerCollector(config, None, None))  # a restarted console
    families = {f.name: f for f in text_string_to_metric_families(text)}
    sent = families["gateway_quiet_to_sent_seconds"].samples
    counts = [s for s in sent if s.name.endswith("_count")]
    sent_runs = ledger.query("SELECT COUNT(*) AS n FROM runs WHERE state='sent'")[0]["n"]
    assert sum(s.value for s in counts) == sent_runs > 10


def quiet_to_sent(text: str) -> tuple[float, float]:
    """(count, sum) of gateway 1's quiet-to-sent histogram in a /metrics text."""
    family = next(
        f for f in text_string_to_metric_families(text) if f.name == "gateway_quiet_to_sent_seconds"
    )
    found = {s.name: s.value for s in family.samples if s.labels.get("gateway") == "1"}
    return found.get("gateway_quiet_to_sent_seconds_count", 0.0), found.get(
        "gateway_quiet_to_sent_seconds_sum", 0.0
    )


def test_a_run_that_ends_between_scrapes_is_counted_once(
    metrics_ledger: tuple[Any, Ledger],
) -> None:
    config, ledger = metrics_ledger
    collector = LedgerCollector(config, None, None)
    study = "1.2.77"
    run, _ = ledger_run(ledger, study, outcome="running")
    assert quiet_to_sent(scrape(collector)) == (0.0, 0.0)  # running: nothing yet
    timings = {"stable_at": time.time() - 5.0, "forward_s": 0.25}
    send = ledger_written(ledger, "1", study, run, timings)
    text = scrape(collector)
    assert 'gateway_model_forward_seconds_count{gateway="1",model="annotate"} 1.0' in text
    assert quiet_to_sent(text) == (0.0, 0.0)  # written, its send queued
    ledger_send(ledger, "1", study, run, send, SendState.SUCCESS)
    finished = ledger.sends(run)[0]["finished"]
    for _ in range(3):  # counted once, however many scrapes see it
        text = scrape(collector)
        assert quiet_to_sent(text) == (1.0, finished - timings["stable_at"])
        assert 'gateway_model_forward_seconds_count{gateway="1",model="annotate"} 1.0' in text
    # a resend succeeds later: the run's first successful send still counts, once
    resend = ledger.apply(
        Transition(
            "1",
            study,
            send=SendChange(SendState.QUEUED, destination="PACS@127.0.0.1:4242", manual=True),
            run_id=run,
        )
    ).send_id
    assert resend is not None
    ledger_send(ledger, "1", study, run, resend, SendState.SUCCESS)
    text = scrape(collector)
    assert quiet_to_sent(text) == (1.0, finished - timings["stable_at"])
    assert histograms(text) == histograms(full_text(config))
