"""`mailmoat scan --reinjected-dir DIR`: the ZIP copy and the password notice a milter hands
back land in DIR as .eml files, and the ZIP opens with 7z using the password from the notice:
a PPAP policy checked end to end without a running gateway."""
from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

from milters.core.mime.parts import find_attachments
from mta.commands.scan_files import copy_name
from tests.harness.milter_proc import ROOT
from tests.integration.test_attachments_milter import (EXTERNAL, INTERNAL, POLICY, SAMPLE, SENDER,
                                                       notice_text, password_from)

pytestmark = pytest.mark.integration


def _scan(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "config.yaml"
    config.write_text("gateway: {hostname: mx.example.jp}\nstore: memory://\n"
                      "milters: [{name: attachments}]\npolicy: policy.yaml\n")
    return subprocess.run([sys.executable, "-m", "mta.cli", "scan", str(SAMPLE), "--config",
                           str(config), "--mail-from", SENDER, "--rcpt", EXTERNAL, "--rcpt",
                           INTERNAL, "--user", "root", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _read(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_the_zip_copy_opens_with_the_password_from_the_notice(tmp_path: Path) -> None:
    out = tmp_path / "handed-back"  # made by scan
    done = _scan(tmp_path, "--reinjected-dir", str(out))
    assert done.returncode == 0, done.stderr
    copy, notice = out / f"01-for-{EXTERNAL}.eml", out / f"02-for-{SENDER}.eml"
    assert sorted(p.name for p in out.iterdir()) == [copy.name, notice.name]
    assert f"-> {copy}" in done.stdout and f"-> {notice}" in done.stdout
    assert all(p.stat().st_mode & 0o077 == 0 for p in (out, copy, notice))  # a password
    originals = sorted(a.data for a in find_attachments(_read(SAMPLE)))
    (archive,) = find_attachments(_read(copy))
    assert archive.filename.endswith(".zip")
    zip_path = tmp_path / "copy.zip"
    zip_path.write_bytes(archive.data)
    password = password_from(notice_text(_read(notice)))
    opened = subprocess.run(["7z", "x", f"-p{password}", f"-o{tmp_path}/files", str(zip_path)],
                            capture_output=True, timeout=60)
    assert opened.returncode == 0, opened.stdout + opened.stderr
    assert sorted(p.read_bytes() for p in (tmp_path / "files").iterdir()) == originals
    wrong = subprocess.run(["7z", "x", "-pwrong", f"-o{tmp_path}/bad", str(zip_path)],
                           capture_output=True, timeout=60)
    assert wrong.returncode != 0


def test_json_names_the_files(tmp_path: Path) -> None:
    done = _scan(tmp_path, "--reinjected-dir", str(tmp_path / "d"), "--json")
    assert done.returncode == 0, done.stderr
    files = [item["file"] for item in json.loads(done.stdout)["reinjected"]]
    assert [Path(f).name for f in files] == [f"01-for-{EXTERNAL}.eml", f"02-for-{SENDER}.eml"]


def test_a_symlink_planted_in_the_directory_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, out / f"01-for-{EXTERNAL}.eml")
    done = _scan(tmp_path, "--reinjected-dir", str(out))
    assert done.returncode == 1 and victim.read_text() == "keep me"
    assert f"mailmoat: {out}/01-for-{EXTERNAL}.eml:" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_an_unwritable_directory_is_a_usage_error_before_any_milter_starts(tmp_path: Path
                                                                            ) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _scan(tmp_path, "--reinjected-dir", str(blocker / "sub"))
    assert done.returncode == 2 and "--reinjected-dir" in done.stderr
    assert "milter_started" not in done.stderr


@pytest.mark.parametrize("recipients,name", [
    (["../../etc/passwd"], "01-for-etc_passwd.eml"),
    ([".hidden@x"], "01-for-hidden@x.eml"),
    (["a b/c\\d@ex"], "01-for-a_b_c_d@ex.eml"),
    (["x" * 500 + "@ex"], "01-for-" + "x" * 80 + ".eml"),
    (["a@ex", "b@ex", "c@ex"], "01-for-a@ex-and-2-more.eml"),
    ([], "01-for-nobody.eml"),
])
def test_file_names_are_safe(recipients: list[str], name: str) -> None:
    assert copy_name(1, recipients) == name
