"""A local part never becomes a path: every address a hostile sender (or a milter's addrcpt)
can name is stored in a Maildir directly under the Maildir root, under a reversible
%XX-encoded name; nothing is written anywhere else."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import unquote

import pytest

from milters.core.config import QueueSettings
from mta.delivery.queue_run import deliver_due
from mta.delivery.maildir import MaildirDelivery
from mta.delivery.routing import Router
from mta.delivery.maildir_names import mailbox_name
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.integration.test_delivery_failures import OPEN_POLICY
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

SETTINGS = QueueSettings(retry=(60.0,), max_age=3600.0)
T0 = 1_800_000_000.0
HOSTILE = [
    "..", ".", "../../../escape", "..@example.jp", ".@example.jp", "../x@example.jp",
    ".hidden@example.jp", "/etc/passwd@example.jp", "a/../../b@example.jp",
    "..\\..\\escape@example.jp", "a\x00b@example.jp", "\x00", "a\r\nX-Injected: 1@example.jp",
    "%2e%2e@example.jp", "%2E%2E%2Fescape@example.jp", "~root@example.jp",
    "x" * 300 + "@example.jp", "../" * 100 + "@example.jp", "日本語@例え.jp",
    "bad\udcffbytes@example.jp", "taro@../../escape", "taro@example.jp/../../x",
    "./@example.jp", "Taro@Example.JP",
]


def files_outside(top: Path, root: Path) -> list[str]:
    """Every file and directory under `top` that is not the Maildir root or inside it."""
    found = []
    for path in top.rglob("*"):
        if path != root and root not in path.parents and path not in root.parents:
            found.append(str(path))
    return found


def assert_contained(root: Path) -> dict[str, Path]:
    """Each mailbox is one plain directory right under root with tmp/new/cur, no symlinks,
    no hidden names; returns the delivered files by mailbox name."""
    delivered = {}
    for box in root.iterdir():
        assert box.is_dir() and not box.is_symlink() and not box.name.startswith(".")
        assert len(box.name.encode()) <= 255
        assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
        for message in (box / "new").iterdir():
            assert message.is_file() and not message.is_symlink()
            delivered[box.name] = message
    return delivered


def test_every_hostile_local_part_stays_under_the_maildir_root(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "a" / "b" / "maildir"
    root.mkdir(parents=True)
    queue = Queue(tmp_path / "spool")
    for rcpt in HOSTILE:
        queue.enqueue(b"Subject: x\r\n\r\nx\r\n", Envelope(
            new_queue_id(T0), "a@outside.example", [RecipientState(rcpt)], received_at=T0))
    before = set(files_outside(tmp_path, root))
    deliver_due(queue, Router(MaildirDelivery(root), {}), SETTINGS, "mx", now=T0)
    assert queue.entries() == []  # every one delivered, none dropped or deferred
    assert set(files_outside(tmp_path, root)) - before - {
        str(p) for p in (tmp_path / "spool").rglob("*")} == set()
    delivered = assert_contained(root)
    for rcpt in HOSTILE:
        name = mailbox_name(rcpt)
        text = delivered[name].read_bytes()
        assert b"\r\nX-Injected" not in text.split(b"\r\n\r\n")[0]  # no header injection
        if len(name) < 255 and "\udcff" not in rcpt:  # long ones end in a hash instead
            local, _, domain = rcpt.rpartition("@")
            assert unquote(name).rpartition("@")[0] == (local.lower() if "@" in rcpt
                                                        else "")
    assert "taro@example.jp" in delivered and "%E6%97%A5%E6%9C%AC%E8%AA%9E@xn--r8jz45g.jp" \
        in delivered


SMTP_HOSTILE = [
    '"../../../escape"@example.jp', '".."@example.jp', '"."@example.jp',
    '".hidden"@example.jp', "/etc/passwd@example.jp", '"a/../../b"@example.jp',
    '"..\\\\..\\\\escape"@example.jp', '"~/.ssh/authorized_keys"@example.jp',
    '"' + "../" * 20 + '"@example.jp', "%2e%2e%2fescape@example.jp", "..@example.jp",
    '"a\\"b"@example.jp',
]


def test_hostile_local_parts_over_smtp_stay_under_the_maildir_root(tmp_path: Path) -> None:
    gateway = Serve(tmp_path, policy=OPEN_POLICY, relay="maildir:deep/a/b/maildir")
    root = tmp_path / "deep" / "a" / "b" / "maildir"
    gateway.start()
    accepted = []
    try:
        for rcpt in SMTP_HOSTILE:
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as conn:
                reader = conn.makefile("rb")
                reader.readline()
                replies = []
                for command in ["EHLO client.test", "XCLIENT ADDR=192.0.2.44",
                                "EHLO client.test", "MAIL FROM:<a@outside.example>",
                                f"RCPT TO:<{rcpt}>"]:
                    conn.sendall(command.encode() + b"\r\n")
                    while (line := reader.readline())[3:4] == b"-":
                        pass
                    replies.append(line.decode())
                if replies[-1].startswith("250"):
                    conn.sendall(b"DATA\r\n")
                    assert reader.readline().startswith(b"354")
                    conn.sendall(b"Subject: x\r\n\r\nx\r\n.\r\n")
                    done = reader.readline().decode()
                    assert done.startswith("250"), done
                    accepted.append((rcpt, done.split()[-1]))
                else:  # refused at SMTP is a defined answer too
                    assert replies[-1][:1] == "5", (rcpt, replies)
                conn.sendall(b"QUIT\r\n")
        for rcpt, queue_id in accepted:
            gateway.wait_log(rf"event=delivered queue_id={queue_id} ")
    finally:
        gateway.stop()
    assert len(accepted) >= 10, accepted  # the attack really reached delivery
    # smtpd keeps a quoted local part as written, quotes and backslashes included.
    assert set(assert_contained(root)) == {mailbox_name(rcpt) for rcpt, _ in accepted}
    for parent in (tmp_path / "deep", tmp_path / "deep" / "a", tmp_path / "deep" / "a" / "b"):
        assert len(os.listdir(parent)) == 1, os.listdir(parent)
    assert not (tmp_path / "escape").exists() and not any(tmp_path.glob("**/escape"))
