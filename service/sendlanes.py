"""Per-destination send lanes: each PACS gets its own bounded set of associations.

A hung or slow PACS then delays no other destination, and one study waiting on a slow PACS
holds no other study for that PACS while it has associations free.

Public API::

    lanes = SendLanes()
    future = lanes.submit(destination, paths)            # Future[SendResult]
    handle = SendHandle()                                # optional: to stop this one send
    future = lanes.submit(destination, paths, handle)
    handle.cancel()                                      # that send ends INTERRUPTED
    lanes.cancel_all()                                   # every queued and open send, at stop
    lanes.close()                                        # no more submits; waits for the rest

* ``submit(destination: PacsConfig, paths: Sequence[Path], handle: SendHandle | None = None)
  -> Future[SendResult]``: one :func:`service.sender.send_files` call (one association, no
  retry), or for a DICOMweb destination (``url``) one :func:`service.stow.send_files_stow`
  call (one STOW-RS request, no retry), on the destination's lane. The future always ends
  with a :class:`SendResult`, never an exception (a bug in the sender comes back as
  ``SendStatus.ERROR``). Raises RuntimeError after :meth:`SendLanes.close`.
* ``cancel_all() -> int``: cancels the handles of every send queued or running now: open
  associations are closed at once, queued sends return without connecting; all with
  ``SendStatus.INTERRUPTED``. Returns how many sends it cancelled.
* ``close(wait: bool = True) -> None``: refuses new submits and shuts the lanes down;
  with ``wait``, returns when every send has ended (each is bounded by its
  ``timeout_seconds``; call :meth:`cancel_all` first to end them now).
* ``SendLanes`` is also a context manager: ``close()`` on exit.

A lane is keyed by the destination's identity: host, port, called and calling AE title and
the TLS files. It runs up to ``destination.max_associations`` associations at once (the
value of the first send to that identity; a later different value is logged and ignored),
further sends to it wait in its queue in submission order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from service.config import PacsConfig
from service.sender import ItemResult, SendHandle, SendResult, SendStatus, send_files
from service.stow import send_files_stow

logger = logging.getLogger(__name__)

#: What identifies a destination's lane.
LaneKey = tuple[str, str, int, str, str, str, str, str]


def lane_key(destination: PacsConfig) -> LaneKey:
    """The destination's identity: where (URL, or host and port), who calls whom, and how
    (TLS)."""
    d = destination
    return (
        d.url,
        d.host,
        d.port,
        d.ae_title,
        d.calling_ae_title,
        d.tls_ca,
        d.tls_cert,
        d.tls_key,
    )


def _where(destination: PacsConfig) -> str:
    """The destination for logs: the DICOMweb URL, or ``AE@host:port``."""
    d = destination
    return d.url if d.dicomweb else f"{d.ae_title}@{d.host}:{d.port}"


@dataclass
class _Lane:
    executor: ThreadPoolExecutor
    size: int
    handles: set[SendHandle] = field(default_factory=set)


class SendLanes:
    """Concurrent C-STORE sends, up to ``max_associations`` per destination (see module)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: dict[LaneKey, _Lane] = {}
        self._closed = False

    def submit(
        self, destination: PacsConfig, paths: Sequence[Path], handle: SendHandle | None = None
    ) -> Future[SendResult]:
        """Send ``paths`` to ``destination`` on its lane; ``handle`` cancels this send."""
        handle = handle or SendHandle()
        key = lane_key(destination)
        with self._lock:
            if self._closed:
                raise RuntimeError("SendLanes is closed")
            lane = self._lanes.get(key)
            if lane is None:
                name = f"send-{destination.host or 'web'}:{destination.port}"
                size = destination.max_associations
                lane = _Lane(ThreadPoolExecutor(size, thread_name_prefix=name), size)
                self._lanes[key] = lane
            elif destination.max_associations != lane.size:
                logger.warning(
                    "%s already has a lane of %d association(s); ignoring max_associations=%d",
                    _where(destination),
                    lane.size,
                    destination.max_associations,
                )
            lane.handles.add(handle)
            future = lane.executor.submit(_send, destination, list(paths), handle)
        future.add_done_callback(lambda _: self._forget(lane, handle))
        return future

    def cancel_all(self) -> int:
        """Interrupt every queued and running send (service stop); how many."""
        with self._lock:
            handles = [h for lane in self._lanes.values() for h in lane.handles]
        for handle in handles:
            handle.cancel()
        if handles:
            logger.warning("interrupting %d send(s)", len(handles))
        return len(handles)

    def close(self, wait: bool = True) -> None:
        """No more submits; with ``wait``, return once every send has ended."""
        with self._lock:
            self._closed = True
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.executor.shutdown(wait=wait)

    def __enter__(self) -> SendLanes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _forget(self, lane: _Lane, handle: SendHandle) -> None:
        with self._lock:
            lane.handles.discard(handle)


def _send(destination: PacsConfig, paths: list[Path], handle: SendHandle) -> SendResult:
    """:func:`send_files` (C-STORE) or :func:`send_files_stow` (a DICOMweb destination),
    with an unexpected exception turned into an ERROR result."""
    try:
        if destination.dicomweb:
            return send_files_stow(destination, paths, handle)
        return send_files(destination, paths, handle)
    except Exception as exc:  # a bug: record it as a value like every other outcome
        logger.exception("send to %s failed", _where(destination))
        items = [ItemResult("", SendStatus.ERROR, None, path) for path in paths]
        return SendResult(SendStatus.ERROR, f"sender failed: {type(exc).__name__}", items)
