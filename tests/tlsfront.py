"""HTTPS in front of a plain-HTTP test server: a TLS-terminating reverse proxy.

Why not Orthanc's own ``SslEnabled``: Debian bookworm's Orthanc 1.10.1 serves HTTP through
libcivetweb1 1.15, which loads ``libssl.so`` at run time and calls
``SSL_get_peer_certificate``, a symbol OpenSSL 3 no longer exports (it is
``SSL_get1_peer_certificate`` now): the first HTTPS request kills Orthanc with SIGSEGV at
address 0 (seen with curl as with Python). Sites often terminate TLS in front of a PACS;
the tests do the same: Python's ``ssl`` (OpenSSL) serves the certificate, and every byte
goes to and from the real Orthanc unchanged.

``TlsFront(certfile, keyfile, target_port)`` as a context manager listens on a free loopback
port (``.port``) and counts the TCP connections it accepted and the TLS handshakes that
failed (``.connections``, ``.failed_handshakes``).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from contextlib import suppress
from pathlib import Path

HANDSHAKE_TIMEOUT_S = 10.0
CHUNK = 1 << 16


class TlsFront:
    """Terminates TLS on ``.port`` and relays each connection to ``127.0.0.1:target_port``."""

    def __init__(self, certfile: Path, keyfile: Path, target_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certfile), str(keyfile))
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self.failed_handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> TlsFront:
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        with suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await writer.start_tls(self.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, ssl.SSLError, OSError):
            self.failed_handshakes += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream or an error, then close the other side."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with suppress(Exception):
            writer.close()
