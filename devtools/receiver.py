"""A small Storage SCP for development: stores what the gateway sends (PS3.4 Annex B).

Each instance is written atomically as ``<dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` in
the DICOM File Format (PS3.10 §7), with the File Meta Information from the association.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from pydicom.filewriter import dcmwrite
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from service.fsutil import atomic_writer
from service.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: PS3.4 B.2.3 / PS3.7 Annex C statuses.
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


def _handle_store(event: evt.Event, directory: Path) -> int:
    """Write one received instance; answer with a C-STORE status."""
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
    except Exception as exc:  # pydicom raises many kinds on a malformed dataset
        logger.error("cannot decode a received dataset: %s", type(exc).__name__)
        return CANNOT_UNDERSTAND
    study = str(ds.get("StudyInstanceUID", ""))
    sop = str(ds.get("SOPInstanceUID", ""))
    if not (is_valid_uid(study) and is_valid_uid(sop)):
        logger.error("refused an instance without valid Study/SOP Instance UIDs")
        return CANNOT_UNDERSTAND
    target = directory / study / f"{sop}.dcm"
    try:
        with atomic_writer(target) as fh:
            dcmwrite(fh, ds, enforce_file_format=True)
    except OSError as exc:
        logger.error("cannot store %s: %s", sop, exc.strerror)
        return OUT_OF_RESOURCES
    logger.info("stored %s (study %s) from %s", sop, study, event.assoc.requestor.ae_title)
    return SUCCESS


def _receiver_ae(ae_title: str) -> AE:
    """An SCP for every storage SOP class and every transfer syntax pynetdicom knows."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    return ae


def start_receiver(
    port: int,
    directory: Path,
    ae_title: str = "DEVRECEIVER",
    host: str = "127.0.0.1",
) -> ThreadedAssociationServer:
    """Start the receiver in a background thread; stop it with ``.shutdown()``."""
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("receiver %s on %s:%d, storing in %s", ae_title, host, port, directory)
    handlers: list[Any] = [(evt.EVT_C_STORE, _handle_store, [directory])]
    server = _receiver_ae(ae_title).start_server((host, port), block=False, evt_handlers=handlers)
    assert server is not None
    return server


def serve_receiver(
    port: int,
    directory: Path,
    ae_title: str = "DEVRECEIVER",
    host: str = "127.0.0.1",
) -> None:
    """Run the receiver until interrupted (returns on KeyboardInterrupt)."""
    server = start_receiver(port, directory, ae_title, host)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    finally:
        server.shutdown()
