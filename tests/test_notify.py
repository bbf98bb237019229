"""Webhook notifications: real local HTTP servers (one answering, one that never does, a
closed port), outcomes recorded as events through a real ledger, never blocking the caller."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.config import NotifyConfig, from_mapping
from service.errors import ConfigError
from service.ledger import Ledger, Transition
from service.notify import QUEUE_SIZE, SERVICE_STOPPED, Notifier, ledger_recorder
from service.values import StudyState
from tests.conftest import free_port

STUDY = "1.2.826.0.1.3680043.10.999.1"


class Hook:
    """A real HTTP server; ``status`` is what it answers, ``hold`` keeps it from answering."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.hold = threading.Event()
        self.release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.bodies.append(json.loads(body))
                if hook.hold.is_set():
                    hook.release.wait(30)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    db = Ledger(tmp_path / "ledger.sqlite3")
    yield db
    db.close()


def events(ledger: Ledger) -> list[tuple[str, str]]:
    return [(r["level"], r["message"]) for r in ledger.query("SELECT * FROM events")]


def fail_study(ledger: Ledger, state: StudyState, reason: str) -> None:
    ledger.apply(Transition("1", STUDY, StudyState.RECEIVING))
    if state == StudyState.SEND_FAILED:
        for step in (StudyState.READY, StudyState.RUNNING, StudyState.WRITTEN, StudyState.SENDING):
            ledger.apply(Transition("1", STUDY, step))
    ledger.apply(Transition("1", STUDY, state, reason))


@pytest.mark.parametrize("state", [StudyState.FAILED, StudyState.SEND_FAILED])
def test_failure_is_posted_and_its_outcome_recorded(
    hook: Hook, ledger: Ledger, state: StudyState
) -> None:
    notifier = Notifier(NotifyConfig(hook.url, 5.0), ledger_recorder(ledger.apply))
    ledger.observers.append(notifier.on_applied)
    notifier.start()
    fail_study(ledger, state, "refused: cannot connect")
    notifier.close(10)
    assert hook.bodies == [
        {
            "gateway": "1",
            "study_uid": STUDY,
            "state": str(state),
            "reason": "refused: cannot connect",
            "time": hook.bodies[0]["time"],
        }
    ]
    assert ("INFO", f"webhook notification ({state}) delivered: HTTP 200") in events(ledger)
    assert notifier.outcomes["delivered"] == 1


def test_other_states_are_not_posted(hook: Hook, ledger: Ledger) -> None:
    notifier = Notifier(NotifyConfig(hook.url, 5.0), ledger_recorder(ledger.apply))
    ledger.observers.append(notifier.on_applied)
    notifier.start()
    ledger.apply(Transition("1", STUDY, StudyState.RECEIVING))
    ledger.apply(Transition("1", STUDY, StudyState.SKIPPED, "no model applies"))
    notifier.close(10)
    assert hook.bodies == [] and events(ledger) == []


def test_unreachable_and_refusing_webhooks_are_recorded_as_failed(ledger: Ledger) -> None:
    refusing = Hook(status=500)
    try:
        for url, expected in (
            (f"http://127.0.0.1:{free_port()}/", "failed after"),
            (refusing.url, "failed: HTTP 500"),
        ):
            notifier = Notifier(NotifyConfig(url, 5.0), ledger_recorder(ledger.apply))
            notifier.start()
            notifier.notify_fatal("the ledger cannot be written")
            notifier.close(10)
            assert notifier.outcomes["failed"] == 1
            assert any(level == "WARNING" and expected in m for level, m in events(ledger))
        assert refusing.bodies[0]["state"] == SERVICE_STOPPED
    finally:
        refusing.close()


def test_a_webhook_that_never_answers_never_blocks_the_caller(hook: Hook, ledger: Ledger) -> None:
    """The caller only queues: while the webhook holds the first POST, notices queue up to
    QUEUE_SIZE and the rest are dropped, and every call returns."""
    hook.hold.set()
    notifier = Notifier(NotifyConfig(hook.url, 60.0), ledger_recorder(ledger.apply))
    notifier.start()
    for _ in range(QUEUE_SIZE + 5):
        notifier.notify_fatal("stopped")
    assert notifier.outcomes["dropped"] >= 4
    hook.release.set()


def test_a_webhook_that_never_answers_times_out(hook: Hook, ledger: Ledger) -> None:
    hook.hold.set()
    notifier = Notifier(NotifyConfig(hook.url, 0.5), ledger_recorder(ledger.apply))
    notifier.start()
    notifier.notify_fatal("stopped")
    notifier.close(30)
    assert notifier.outcomes["failed"] == 1
    assert any("failed after" in m and "timed out" in m for _, m in events(ledger)), events(ledger)


def test_no_webhook_configured_posts_nothing(ledger: Ledger) -> None:
    notifier = Notifier(NotifyConfig(), ledger_recorder(ledger.apply))
    notifier.start()
    notifier.notify_fatal("stopped")
    notifier.close(1)
    assert not notifier.enabled and events(ledger) == []


def test_webhook_url_is_validated_naming_the_key() -> None:
    assert from_mapping({"notify": {"webhook_url": "https://hooks.example/x/"}}).notify == (
        NotifyConfig("https://hooks.example/x/", 5.0)
    )
    for bad in ("ftp://x", "http://user:pw@x/", 3):
        with pytest.raises(ConfigError, match=r"notify\.webhook_url"):
            from_mapping({"notify": {"webhook_url": bad}})
    with pytest.raises(ConfigError, match=r"notify\.timeout_seconds"):
        from_mapping({"notify": {"timeout_seconds": 0}})
    with pytest.raises(ConfigError, match=r"notify\.retries"):
        from_mapping({"notify": {"retries": 1}})


def test_http_listen_address_is_validated_naming_the_key() -> None:
    assert from_mapping({"service": {"http": ""}}).http == ""
    assert from_mapping({"service": {"http": "[::1]:9000"}}).http == "[::1]:9000"
    for bad in ("8080", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError, match=r"service\.http"):
            from_mapping({"service": {"http": bad}})
