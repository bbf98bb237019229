"""Real C-STORE peers for the sender tests (a pytest plugin: ``start_peer``, ``start_proxy``).

* :func:`start_peer` starts a pynetdicom Storage SCP on loopback;
* :class:`TrickleProxy` sits in front of one and passes its answers on a byte at a time:
  a PACS that keeps answering, each byte well within any per-read timeout, but never done.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, MRImageStorage
from pydicom.uid import SecondaryCaptureImageStorage as SC
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.transport import ThreadedAssociationServer

from devtools.sample import pydicom_file
from service.config import DEFAULT_UID_ROOT, PacsConfig
from service.uids import UidFactory
from tests.conftest import free_port


def copy_with_new_uids(source: str, folder: Path, uids: UidFactory, name: str) -> Path:
    """``source`` (a pydicom test file) as a new instance in a new study."""
    ds = dcmread(pydicom_file(source))
    ds.StudyInstanceUID = uids.uid(name, "study")
    ds.SeriesInstanceUID = uids.uid(name, "series")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids.uid(name, "sop")
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def uids() -> UidFactory:
    return UidFactory(DEFAULT_UID_ROOT, "test-send", uuid.uuid4().hex)


@pytest.fixture
def ct(tmp_path: Path, uids: UidFactory) -> Path:
    """CT_small as a new instance in a new study."""
    return copy_with_new_uids("CT_small.dcm", tmp_path, uids, "ct")


@pytest.fixture
def mr(tmp_path: Path, uids: UidFactory) -> Path:
    """MR_small as a new instance in a new study."""
    return copy_with_new_uids("MR_small.dcm", tmp_path, uids, "mr")


def destination_at(port: int, ae_title: str, timeout: float, **more: Any) -> PacsConfig:
    return PacsConfig(
        host="127.0.0.1",
        port=port,
        ae_title=ae_title,
        calling_ae_title="GATEWAY_TEST",
        timeout_seconds=timeout,
        **more,
    )


class Peer:
    """A pynetdicom SCP on loopback that counts the connections it accepts."""

    def __init__(self, server: ThreadedAssociationServer, ae_title: str, port: int) -> None:
        self.server = server
        self.port = port
        self.ae_title = ae_title
        self.connections = 0
        self.requests = 0

    def destination(
        self, timeout: float = 5.0, ae_title: str | None = None, **more: Any
    ) -> PacsConfig:
        return destination_at(self.port, ae_title or self.ae_title, timeout, **more)


@pytest.fixture
def start_peer() -> Iterator[Callable[..., Peer]]:
    servers: list[ThreadedAssociationServer] = []

    def start(
        on_store: Callable[[evt.Event], int] | None = None,
        sop_classes: tuple[str, ...] = (CTImageStorage, MRImageStorage, SC),
        require_called_aet: bool = False,
        ae_title: str = "PEER",
        transfer_syntaxes: list[str] | None = None,
        max_pdu: int = 16382,
        more_handlers: list[Any] | None = None,
    ) -> Peer:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ae.maximum_pdu_size = max_pdu
        for uid in sop_classes:
            ae.add_supported_context(uid, transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES)
        port = free_port()
        peer: Peer

        def opened(event: evt.Event) -> None:
            peer.connections += 1

        def requested(event: evt.Event) -> None:
            peer.requests += 1

        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, opened),
            (evt.EVT_REQUESTED, requested),
            (evt.EVT_C_STORE, on_store or (lambda event: 0x0000)),
            *(more_handlers or []),
        ]
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
        assert server is not None
        servers.append(server)
        peer = Peer(server, ae_title, port)
        return peer

    yield start
    for server in servers:
        server.shutdown()


class TrickleProxy:
    """A TCP proxy to ``upstream_port``: what the client sends goes through at once; what
    the server answers goes back one byte every ``interval`` seconds, after the first
    ``whole_pdus`` PDUs (1: the A-ASSOCIATE-AC passes whole, the C-STORE-RSP trickles)."""

    def __init__(self, upstream_port: int, interval: float = 0.5, whole_pdus: int = 1) -> None:
        self.upstream_port = upstream_port
        self.interval = interval
        self.whole_pdus = whole_pdus
        self.connections = 0
        self.trickled = 0  # bytes sent one at a time, over all connections
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def destination(self, ae_title: str, timeout: float, **more: Any) -> PacsConfig:
        return destination_at(self.port, ae_title, timeout, **more)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            for target in (self._forward, self._trickle):
                thread = threading.Thread(target=target, args=(client, upstream), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to server, as it comes."""
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client], [], [], 0.1)
                if ready:
                    data = client.recv(65536)
                    if not data:
                        break
                    upstream.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

    def _trickle(self, client: socket.socket, upstream: socket.socket) -> None:
        """Server to client: ``whole_pdus`` PDUs at once, then a byte per ``interval``."""
        pending = bytearray()
        whole = self.whole_pdus
        due = 0.0
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([upstream], [], [], 0.05)
                if ready:
                    data = upstream.recv(65536)
                    if not data and not pending:
                        break
                    pending += data
                while whole and len(pending) >= 6:
                    size = 6 + int.from_bytes(pending[2:6], "big")
                    if len(pending) < size:
                        break
                    client.sendall(pending[:size])
                    del pending[:size]
                    whole -= 1
                if not whole and pending and time.monotonic() >= due:
                    client.sendall(pending[:1])
                    del pending[:1]
                    self.trickled += 1
                    due = time.monotonic() + self.interval
        except OSError:
            pass  # the client gave up
        finally:
            for sock in (client, upstream):
                with suppress(OSError):
                    sock.close()


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., TrickleProxy]]:
    proxies: list[TrickleProxy] = []

    def start(upstream_port: int, interval: float = 0.5, whole_pdus: int = 1) -> TrickleProxy:
        proxy = TrickleProxy(upstream_port, interval, whole_pdus)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()
