"""C-STORE sending: a real Orthanc, and real pynetdicom/socket peers that misbehave."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from devtools.sample import pydicom_file
from service import sender
from service.config import PacsConfig
from service.fastsend import store_command
from service.sender import (
    INTERRUPTED_REASON,
    ItemResult,
    SendHandle,
    SendStatus,
    classify,
    send_files,
)
from service.uids import UidFactory
from tests.conftest import free_port
from tests.helpers import stored_uid
from tests.orthanc import Orthanc
from tests.peers import Peer, TrickleProxy, copy_with_new_uids


@pytest.fixture(autouse=True, params=["fast", "public"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on both data paths: service.fastsend and send_c_store."""
    monkeypatch.setattr(sender, "FAST_PATH", request.param == "fast")
    return str(request.param)


@pytest.fixture
def sc(tmp_path: Path, uids: UidFactory, ct: Path) -> Path:
    """A highdicom Secondary Capture in the CT's study, JPEG 2000 lossless encoded."""
    reference = dcmread(ct)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.arange(64 * 64, dtype=np.uint8).reshape(64, 64),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.uid("sc", "series"),
        series_number=900,
        sop_instance_uid=uids.uid("sc", "sop"),
        instance_number=1,
        manufacturer="test",
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.4.90",
    )
    path = tmp_path / "sc.dcm"
    image.save_as(path, enforce_file_format=True)
    return path


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- real Orthanc ------------------------------------------------------------------------


def test_send_to_orthanc_stores_every_instance(
    orthanc: Orthanc,
    ct: Path,
    mr: Path,
    sc: Path,
) -> None:
    """CT, MR and a JPEG 2000 SC go over one association and land in Orthanc, in their
    studies."""
    destination = PacsConfig(
        host="127.0.0.1", port=orthanc.dicom_port, ae_title=orthanc.ae_title, timeout_seconds=10
    )
    result = send_files(destination, [ct, mr, sc])

    assert result.status is SendStatus.SUCCESS, result.reason
    assert [i.status for i in result.items] == [SendStatus.SUCCESS] * 3
    assert [i.status_code for i in result.items] == [0, 0, 0]
    assert [i.sop_instance_uid for i in result.items] == [sop_uid(p) for p in (ct, mr, sc)]

    stored = {}
    for path in (ct, mr, sc):
        found = orthanc.lookup(sop_uid(path))
        assert len(found) == 1, f"{path.name} not stored in Orthanc"
        tags = orthanc.get(f"/instances/{found[0]}/simplified-tags")
        assert tags["SOPInstanceUID"] == sop_uid(path)
        stored[path.name] = tags
    assert stored["sc.dcm"]["StudyInstanceUID"] == stored["ct.dcm"]["StudyInstanceUID"]
    assert stored["mr.dcm"]["StudyInstanceUID"] != stored["ct.dcm"]["StudyInstanceUID"]
    study = orthanc.get(f"/instances/{orthanc.lookup(sop_uid(ct))[0]}/study")
    assert len(study["Series"]) == 2  # the CT series and the SC series


# -- misbehaving peers -------------------------------------------------------------------


def assert_all(items: list[ItemResult], status: SendStatus, code: int | None) -> None:
    assert items, "no item results"
    assert all(i.status is status and i.status_code == code for i in items), items


def test_nothing_listening_is_refused(ct: Path) -> None:
    destination = PacsConfig(host="127.0.0.1", port=free_port(), timeout_seconds=2)
    result = send_files(destination, [ct])
    assert result.status is SendStatus.REFUSED
    assert "cannot connect" in result.reason
    assert_all(result.items, SendStatus.REFUSED, None)


def test_wrong_called_ae_title_is_rejected_once(start_peer: Callable[..., Peer], ct: Path) -> None:
    peer = start_peer(require_called_aet=True, ae_title="RIGHT_AET")
    result = send_files(peer.destination(ae_title="WRONG_AET"), [ct])
    assert result.status is SendStatus.REJECTED
    assert "Called AE title not recognised" in result.reason
    assert_all(result.items, SendStatus.REJECTED, None)
    assert peer.connections == 1


def test_peer_abort_during_send_is_aborted(
    start_peer: Callable[..., Peer], ct: Path, mr: Path
) -> None:
    def abort(event: evt.Event) -> int:
        event.assoc.abort()
        return 0x0000

    peer = start_peer(on_store=abort)
    result = send_files(peer.destination(), [ct, mr])
    assert result.status is SendStatus.ABORTED, result.reason
    assert_all(result.items, SendStatus.ABORTED, None)
    assert peer.connections == 1


def test_peer_that_never_answers_the_request_times_out(ct: Path) -> None:
    """A raw TCP server that accepts and says nothing: the ACSE timeout ends the attempt."""
    accepted: list[socket.socket] = []
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.1)
        port = listener.getsockname()[1]

        def accept() -> None:
            while not stop.is_set():
                try:
                    accepted.append(listener.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            result = send_files(PacsConfig(host="127.0.0.1", port=port, timeout_seconds=1), [ct])
        finally:
            stop.set()
            thread.join(timeout=10)
    for conn in accepted:
        conn.close()
    assert result.status is SendStatus.TIMED_OUT, result.reason
    assert_all(result.items, SendStatus.TIMED_OUT, None)
    assert len(accepted) == 1


def test_peer_that_never_answers_a_store_times_out(
    start_peer: Callable[..., Peer], ct: Path
) -> None:
    release = threading.Event()

    def stall(event: evt.Event) -> int:
        release.wait(timeout=30)
        return 0x0000

    peer = start_peer(on_store=stall)
    try:
        result = send_files(peer.destination(timeout=1), [ct])
    finally:
        release.set()
    assert result.status is SendStatus.TIMED_OUT, result.reason
    assert "association exceeded timeout_seconds=1 while sending instance 1 of 1" in result.reason
    assert_all(result.items, SendStatus.TIMED_OUT, None)
    assert peer.connections == 1


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (0xA700, SendStatus.FAILURE),
        (0xC000, SendStatus.FAILURE),
        (0xB000, SendStatus.WARNING),
        (0xB007, SendStatus.WARNING),
    ],
)
def test_peer_status_is_reported_per_instance(
    start_peer: Callable[..., Peer], ct: Path, mr: Path, code: int, status: SendStatus
) -> None:
    peer = start_peer(on_store=lambda event: code)
    result = send_files(peer.destination(), [ct, mr])
    assert result.status is status
    assert_all(result.items, status, code)
    assert [i.sop_instance_uid for i in result.items] == [sop_uid(ct), sop_uid(mr)]
    assert peer.connections == 1


def test_mixed_statuses_report_the_worst(
    start_peer: Callable[..., Peer], ct: Path, mr: Path
) -> None:
    def by_modality(event: evt.Event) -> int:
        return 0xB000 if event.request.AffectedSOPClassUID == CTImageStorage else 0x0000

    result = send_files(start_peer(on_store=by_modality).destination(), [ct, mr])
    assert result.status is SendStatus.WARNING
    assert [i.status for i in result.items] == [SendStatus.WARNING, SendStatus.SUCCESS]


def test_unsupported_sop_class_has_no_context(start_peer: Callable[..., Peer], ct: Path) -> None:
    peer = start_peer(sop_classes=(MRImageStorage,))
    result = send_files(peer.destination(), [ct])
    assert result.status is SendStatus.NO_CONTEXT, result.reason
    assert_all(result.items, SendStatus.NO_CONTEXT, None)
    assert peer.connections == 1


def test_partly_supported_study_sends_what_it_can(
    start_peer: Callable[..., Peer], ct: Path, mr: Path
) -> None:
    stored: list[str] = []

    def store(event: evt.Event) -> int:
        stored.append(stored_uid(event))
        return 0x0000

    peer = start_peer(on_store=store, sop_classes=(MRImageStorage,))
    result = send_files(peer.destination(), [ct, mr])
    assert result.status is SendStatus.NO_CONTEXT
    assert [i.status for i in result.items] == [SendStatus.NO_CONTEXT, SendStatus.SUCCESS]
    assert stored == [sop_uid(mr)]
    assert peer.connections == 1


def test_unreadable_file_is_not_sent(start_peer: Callable[..., Peer], tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    peer = start_peer()
    result = send_files(peer.destination(), [bad])
    assert result.status is SendStatus.ERROR
    assert result.items == [ItemResult("", SendStatus.ERROR, None, bad)]
    assert peer.connections == 0


def test_input_files_are_unchanged_after_sending(
    start_peer: Callable[..., Peer], ct: Path, mr: Path
) -> None:
    before = {p: p.read_bytes() for p in (ct, mr)}
    result = send_files(start_peer().destination(), [ct, mr])
    assert result.status is SendStatus.SUCCESS, result.reason
    assert {p: p.read_bytes() for p in (ct, mr)} == before


def test_compressed_object_needs_its_own_transfer_syntax(
    start_peer: Callable[..., Peer], ct: Path, sc: Path
) -> None:
    """We never transcode: a JPEG 2000 object to a peer accepting only uncompressed syntaxes
    is NO_CONTEXT, while the uncompressed CT is still stored."""
    result = send_files(start_peer().destination(), [ct, sc])
    assert result.status is SendStatus.NO_CONTEXT
    assert [i.status for i in result.items] == [SendStatus.SUCCESS, SendStatus.NO_CONTEXT]


def test_classify_follows_ps3_4_annex_b() -> None:
    assert classify(0x0000) is SendStatus.SUCCESS
    assert classify(0xB000) is SendStatus.WARNING
    assert classify(0xB006) is SendStatus.WARNING
    assert classify(0x0107) is SendStatus.WARNING
    assert classify(0xA900) is SendStatus.FAILURE
    assert classify(0x0122) is SendStatus.FAILURE


# -- the direct C-STORE path ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("instance", "msg_id"), [("1.2.3.4", 1), ("1.2.826.0.1.3680043.10.1.12345", 65535)]
)
def test_store_command_is_what_pynetdicom_encodes(instance: str, msg_id: int) -> None:
    """Our C-STORE-RQ Command Set is byte for byte pynetdicom's (odd and even UIDs)."""
    primitive = C_STORE()
    primitive.MessageID = msg_id
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = instance
    primitive.Priority = 0x0002
    primitive.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    assert store_command(CTImageStorage, instance, msg_id) == encode(
        message.command_set, True, True
    )


def large_ct(folder: Path, uids: UidFactory, name: str, rows: int = 512) -> Path:
    """CT_small with a ``rows`` x ``rows`` 16-bit image (about 512 KB at 512)."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.Rows = ds.Columns = rows
    pixels = np.random.default_rng(7).integers(0, 4000, (rows, rows), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids.uid(name, "sop")
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def file_data_set(path: Path) -> bytes:
    """The bytes of ``path`` after its File Meta (PS3.10 §7.1: preamble, "DICM", then the
    group length element and the group it counts)."""
    meta_length = int(
        dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    )
    return path.read_bytes()[128 + 4 + 12 + meta_length :]


def test_large_instance_is_fragmented_to_the_peers_max_pdu(
    start_peer: Callable[..., Peer], tmp_path: Path, uids: UidFactory
) -> None:
    """A 512 KB instance goes in P-DATA-TFs within the peer's 4 KB limit (PS3.8 D.1), the
    peer gets the file's data set byte for byte, and the association is then released."""
    big = large_ct(tmp_path, uids, "big")
    pdu_lengths: list[int] = []
    received: list[bytes] = []
    ended: list[str] = []
    done = threading.Event()

    def store(event: evt.Event) -> int:
        received.append(cast(BytesIO, cast(C_STORE, event.request).DataSet).getvalue())
        return 0x0000

    def end(event: evt.Event) -> None:
        ended.append(event.event.name)
        done.set()

    def pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            pdu_lengths.append(event.pdu.pdu_length)

    peer = start_peer(
        on_store=store,
        max_pdu=4096,
        more_handlers=[
            (evt.EVT_PDU_RECV, pdu),
            (evt.EVT_RELEASED, end),
            (evt.EVT_ABORTED, end),
        ],
    )
    result = send_files(peer.destination(), [big])
    assert result.status is SendStatus.SUCCESS, result.reason
    assert received == [file_data_set(big)]
    assert max(pdu_lengths) <= 4096
    assert len(pdu_lengths) > 512 * 512 * 2 // 4096
    done.wait(timeout=10)
    assert ended == ["EVT_RELEASED"]


def test_uncompressed_object_is_converted_when_its_syntax_is_refused(
    start_peer: Callable[..., Peer], ct: Path
) -> None:
    """An Explicit VR file to a peer that takes only Implicit VR Little Endian arrives
    re-encoded in Implicit VR, with the same content (PS3.5 §10.1)."""
    received: list[tuple[str, Any]] = []

    def store(event: evt.Event) -> int:
        received.append((event.context.transfer_syntax, event.dataset))
        return 0x0000

    peer = start_peer(on_store=store, transfer_syntaxes=[ImplicitVRLittleEndian])
    result = send_files(peer.destination(), [ct])
    assert result.status is SendStatus.SUCCESS, result.reason
    [(syntax, dataset)] = received
    assert syntax == ImplicitVRLittleEndian
    original = dcmread(ct)
    assert dataset.SOPInstanceUID == original.SOPInstanceUID
    assert dataset.PixelData == original.PixelData
    assert dataset.PatientName == original.PatientName


def test_many_instances_share_one_association(
    start_peer: Callable[..., Peer], tmp_path: Path, uids: UidFactory
) -> None:
    """30 instances: one association, Message IDs 1..30 in order, each stored once."""
    paths = [copy_with_new_uids("CT_small.dcm", tmp_path, uids, f"ct{i}") for i in range(30)]
    seen: list[tuple[int, str]] = []

    def store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        seen.append((int(cast(int, request.MessageID)), str(request.AffectedSOPInstanceUID)))
        return 0x0000

    peer = start_peer(on_store=store)
    result = send_files(peer.destination(), paths)
    assert result.status is SendStatus.SUCCESS, result.reason
    assert seen == [(i, sop_uid(p)) for i, p in enumerate(paths, start=1)]
    assert [i.status_code for i in result.items] == [0] * 30
    assert peer.connections == 1


# -- the whole-association deadline and cancellation -----------------------------------------

#: Generous bound for a send with timeout_seconds=3: proves the bound, is no benchmark.
BOUND_S = 15.0
#: Generous bound for a cancelled send to return.
PROMPT_S = 5.0


def test_trickling_store_response_times_out_at_the_association_deadline(
    start_peer: Callable[..., Peer],
    start_proxy: Callable[..., TrickleProxy],
    ct: Path,
    mr: Path,
) -> None:
    """A PACS answering a byte every 0.5 s (each well within a 3 s read timeout) is cut off
    when the association has lasted timeout_seconds=3, not after the whole answer."""
    peer = start_peer()
    proxy = start_proxy(peer.port, interval=0.5)
    started = time.monotonic()
    result = send_files(proxy.destination(peer.ae_title, timeout=3), [ct, mr])
    elapsed = time.monotonic() - started
    assert result.status is SendStatus.TIMED_OUT, result.reason
    assert "association exceeded timeout_seconds=3 while sending instance 1 of 2" in result.reason
    assert_all(result.items, SendStatus.TIMED_OUT, None)
    assert elapsed < BOUND_S
    assert proxy.trickled > 0, "the peer was answering all along"
    assert proxy.connections == 1


def test_trickling_association_answer_times_out_at_the_association_deadline(
    start_peer: Callable[..., Peer], start_proxy: Callable[..., TrickleProxy], ct: Path
) -> None:
    """The A-ASSOCIATE-AC itself a byte every 0.5 s: pynetdicom would read it to the end."""
    peer = start_peer()
    proxy = start_proxy(peer.port, interval=0.5, whole_pdus=0)
    started = time.monotonic()
    result = send_files(proxy.destination(peer.ae_title, timeout=3), [ct])
    elapsed = time.monotonic() - started
    assert result.status is SendStatus.TIMED_OUT, result.reason
    assert_all(result.items, SendStatus.TIMED_OUT, None)
    assert elapsed < BOUND_S
    assert proxy.trickled > 0
    assert proxy.connections == 1


def test_hung_store_keeps_the_status_of_the_instances_answered_before(
    start_peer: Callable[..., Peer], ct: Path, mr: Path
) -> None:
    """The CT is stored, the MR's C-STORE never answered: CT success, MR timed out."""
    release = threading.Event()

    def store(event: evt.Event) -> int:
        if event.request.AffectedSOPClassUID == MRImageStorage:
            release.wait(timeout=30)
        return 0x0000

    peer = start_peer(on_store=store)
    started = time.monotonic()
    try:
        result = send_files(peer.destination(timeout=3), [ct, mr])
    finally:
        release.set()
    assert time.monotonic() - started < BOUND_S
    assert result.status is SendStatus.TIMED_OUT, result.reason
    assert "while sending instance 2 of 2 (1 of 2 instance(s) answered)" in result.reason
    assert [(i.status, i.status_code) for i in result.items] == [
        (SendStatus.SUCCESS, 0),
        (SendStatus.TIMED_OUT, None),
    ]
    assert peer.connections == 1


def cancel_on(signal: threading.Event, handle: SendHandle, when: list[float]) -> threading.Thread:
    """A thread that cancels ``handle`` once ``signal`` is set, noting when."""

    def run() -> None:
        if signal.wait(timeout=20):
            when.append(time.monotonic())
            handle.cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_cancel_during_a_hung_store_is_interrupted_at_once(
    start_peer: Callable[..., Peer], ct: Path
) -> None:
    entered, release = threading.Event(), threading.Event()

    def stall(event: evt.Event) -> int:
        entered.set()
        release.wait(timeout=60)
        return 0x0000

    peer = start_peer(on_store=stall)
    handle = SendHandle()
    cancelled_at: list[float] = []
    canceller = cancel_on(entered, handle, cancelled_at)
    try:
        result = send_files(peer.destination(timeout=60), [ct], handle)
    finally:
        release.set()
    ended = time.monotonic()
    canceller.join(timeout=10)
    assert cancelled_at, "the store never reached the peer"
    assert ended - cancelled_at[0] < PROMPT_S
    assert result.status is SendStatus.INTERRUPTED, result.reason
    assert result.reason.startswith(f"{INTERRUPTED_REASON} while sending instance 1 of 1")
    assert_all(result.items, SendStatus.INTERRUPTED, None)
    assert handle.cancelled


def test_cancel_during_association_negotiation_is_interrupted_at_once(
    start_peer: Callable[..., Peer], start_proxy: Callable[..., TrickleProxy], ct: Path
) -> None:
    """Cancelled while the A-ASSOCIATE-AC trickles in (pynetdicom blocked reading it)."""
    requested = threading.Event()
    peer = start_peer(more_handlers=[(evt.EVT_REQUESTED, lambda event: requested.set())])
    proxy = start_proxy(peer.port, interval=0.5, whole_pdus=0)
    handle = SendHandle()
    cancelled_at: list[float] = []
    canceller = cancel_on(requested, handle, cancelled_at)
    result = send_files(proxy.destination(peer.ae_title, timeout=60), [ct], handle)
    ended = time.monotonic()
    canceller.join(timeout=10)
    assert cancelled_at, "the association request never reached the peer"
    assert ended - cancelled_at[0] < PROMPT_S
    assert result.status is SendStatus.INTERRUPTED, result.reason
    assert "negotiating the association" in result.reason
    assert_all(result.items, SendStatus.INTERRUPTED, None)


def test_send_cancelled_before_it_starts_connects_to_nothing(
    start_peer: Callable[..., Peer], ct: Path
) -> None:
    peer = start_peer()
    handle = SendHandle()
    handle.cancel()
    result = send_files(peer.destination(), [ct], handle)
    assert result.status is SendStatus.INTERRUPTED
    assert result.reason == INTERRUPTED_REASON
    assert_all(result.items, SendStatus.INTERRUPTED, None)
    assert peer.connections == 0


def test_status_text_names_each_storage_status_from_the_standard_table() -> None:
    """Every status of PS3.4 Annex B's Storage Service Class table (pynetdicom's copy) with
    its meaning; a code the table lacks as its hex alone."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    from service.sender import status_text

    for code, (category, meaning) in STORAGE_SERVICE_CLASS_STATUS.items():
        assert status_text(code) == f"0x{code:04X} {meaning or category}"
    assert status_text(0xA700) == "0xA700 Refused: Out of Resources"
    assert status_text(0xA7FF) == "0xA7FF Refused: Out of Resources"
    assert status_text(0x0000) == "0x0000 Success"
    assert status_text(0xB0F1) == "0xB0F1"
