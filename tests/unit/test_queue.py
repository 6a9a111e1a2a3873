"""The durable queue: complete entries only, sortable unique IDs, hold/release, recovery,
and a full disk that refuses cleanly."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mta.queue.spool import Envelope, NoSuchMessage, Queue, RecipientState, SpoolError, new_queue_id

RAW = b"Subject: hi\r\n\r\nbody\r\n"


def envelope(queue_id: str | None = None, rcpts: tuple[str, ...] = ("taro@example.jp",)
             ) -> Envelope:
    return Envelope(queue_id or new_queue_id(), "a@outside.example",
                    [RecipientState(r) for r in rcpts], received_at=1.0, client_ip="192.0.2.7")


def test_enqueue_writes_one_file_with_its_envelope_and_reads_back(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    queue_id = queue.enqueue(RAW, envelope())
    [stored] = (tmp_path / "active").iterdir()
    assert stored.name == f"{queue_id}.msg"
    assert stored.read_bytes().startswith(RAW)  # the message first, the envelope after it
    assert list((tmp_path / "tmp").iterdir()) == []
    assert queue.message(queue_id) == RAW
    back = queue.envelope(queue_id)
    assert back.sender == "a@outside.example" and back.size == len(RAW)
    assert [r.address for r in back.pending()] == ["taro@example.jp"]
    back.attempts = 3
    queue.update(back)  # a rewritten envelope goes beside the message and wins
    assert queue.envelope(queue_id).attempts == 3 and queue.message(queue_id) == RAW
    assert [e.attempts for e in queue.entries()] == [3]
    queue.remove(queue_id)
    assert list((tmp_path / "active").iterdir()) == []


def test_queue_ids_are_unique_and_sort_by_arrival() -> None:
    ids = [new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert new_queue_id(1_000.0) < new_queue_id(1_000.001) < new_queue_id(2_000_000_000.0)
    assert all(i.isalnum() and len(i) == 20 for i in ids)


def test_hold_release_due_and_flush(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    first = queue.enqueue(RAW, envelope())
    second = queue.enqueue(RAW, envelope())
    queue.hold(first, "quarantined by auth: DMARC fail")
    assert [e.queue_id for e in queue.due(now=10.0)] == [second]
    later = queue.envelope(second)
    later.next_attempt = 500.0
    queue.update(later)
    assert queue.due(now=10.0) == []
    assert queue.flush() == 1 and [e.queue_id for e in queue.due(10.0)] == [second]
    queue.release(first)
    assert {e.queue_id for e in queue.due(10.0)} == {first, second}
    with pytest.raises(NoSuchMessage):
        queue.release(first)  # not on hold any more
    queue.remove(first)
    with pytest.raises(NoSuchMessage):
        queue.envelope(first)
    with pytest.raises(NoSuchMessage):
        queue.envelope("../../etc/passwd")


def test_recovery_keeps_complete_entries_and_drops_unacknowledged_ones(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    kept = queue.enqueue(RAW, envelope())
    orphan = new_queue_id()
    (tmp_path / "active" / f"{orphan}.msg").write_bytes(RAW)  # no envelope trailer
    (tmp_path / "active" / f"{new_queue_id()}.env").write_bytes(b"{}")  # message removed
    (tmp_path / "tmp" / f"{new_queue_id()}.msg").write_bytes(b"half")
    assert Queue(tmp_path).recover() == [orphan]
    assert [e.queue_id for e in queue.entries()] == [kept]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [p.name for p in (tmp_path / "active").iterdir()] == [f"{kept}.msg"]


def test_a_full_disk_is_a_clean_spool_error(tiny_disk: Path) -> None:
    queue = Queue(tiny_disk / "spool")
    with pytest.raises(SpoolError, match="disk full"):
        queue.enqueue(b"x" * 200_000, envelope())
    assert list((tiny_disk / "spool" / "tmp").iterdir()) == []
    assert list((tiny_disk / "spool" / "active").iterdir()) == []
    small = queue.enqueue(RAW, envelope())  # the space it tried to use was given back
    assert queue.message(small) == RAW
    assert os.statvfs(tiny_disk).f_bfree > 0


def test_envelope_json_keeps_every_field() -> None:
    """to_dict is written by hand for speed: a field added to Envelope must not be lost."""
    from dataclasses import asdict, fields
    envelope = Envelope("06615EBE55296C87A7C5", "a@example.jp",
                        [RecipientState("b@example.jp", "NOTIFY=NEVER", "deferred", "451 x")],
                        1.5, client_ip="192.0.2.1", helo="h", attempts=2, next_attempt=3.0,
                        hold_reason="held", size=10, extra={"auth_user": "taro"})
    assert envelope.to_dict() == asdict(envelope)
    assert {f.name for f in fields(Envelope)} == set(envelope.to_dict())
    assert Envelope.from_json(envelope.to_json()) == envelope


def test_a_message_being_received_reads_back_exactly_small_or_large(tmp_path: Path) -> None:
    """read() (what the milters get) equals the file, whether it comes from the copy kept
    in memory for small messages or from the file once the message outgrew it."""
    queue = Queue(tmp_path / "spool")
    small = queue.receive("0000000000000A000001")
    small.write(b"Received: x\r\n")
    small.write(b"Subject: small\r\n\r\nbody\r\n")
    assert small.read() == Path(small.path).read_bytes() == (
        b"Received: x\r\nSubject: small\r\n\r\nbody\r\n")
    small.discard()
    large = queue.receive("0000000000000A000002")
    chunk = b"x" * 1000 + b"\r\n"
    for _ in range(100):  # 100 KB: past what is kept in memory
        large.write(chunk)
    assert large.read() == Path(large.path).read_bytes() == chunk * 100
    large.discard()
