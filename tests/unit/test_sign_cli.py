"""`mailmoat dkim keygen`: the key file (0600 whatever the umask, never overwritten), the TXT
record in 255-byte strings that the key's public half verifies, and clear errors."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from milters.core.dkim_keys import load_private_key, public_record
from mta.cli import main


def keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(["dkim", "keygen", "--domain", "Example.JP", "--selector", "s1", *args])
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("kind, bits", [("rsa", None), ("rsa", "3072"), ("ed25519", None)])
def test_keygen_writes_a_0600_key_and_prints_its_record(tmp_path, capsys, kind, bits):
    old = os.umask(0)  # a careless umask must not make the key readable by others
    try:
        code, out = keygen(tmp_path, capsys, "--type", kind, *(["--bits", bits] if bits else []))
    finally:
        os.umask(old)
    assert code == 0, out
    path = tmp_path / "example.jp.s1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    algorithm, key = load_private_key(path)
    assert algorithm == ("rsa-sha256" if kind == "rsa" else "ed25519-sha256")
    if kind == "rsa":
        assert key.key_size == int(bits or 2048)
        assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    line = re.search(r'^s1\._domainkey\.example\.jp\. IN TXT \( (.*) \)$', out, re.M)
    assert line is not None, out
    strings = re.findall(r'"([^"]*)"', line[1])
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == public_record(key)


def test_keygen_never_overwrites_a_key(tmp_path, capsys):
    assert keygen(tmp_path, capsys)[0] == 0
    before = (tmp_path / "example.jp.s1.key").read_bytes()
    code, out = keygen(tmp_path, capsys)
    assert code == 1 and "exists; not overwritten" in out
    assert (tmp_path / "example.jp.s1.key").read_bytes() == before


@pytest.mark.parametrize("args, problem", [
    (["--type", "ed25519", "--bits", "2048"], "--bits is for RSA keys"),
    (["--bits", "512"], "choose 1024 to 8192"),
    (["--out", "/nonexistent/dir/k.key"], "cannot write /nonexistent/dir/k.key"),
])
def test_keygen_refuses_clearly(tmp_path, capsys, args, problem):
    code, out = keygen(tmp_path, capsys, *args)
    assert code == 1 and problem in out and "Traceback" not in out


@pytest.mark.parametrize("domain, selector", [("exa mple.jp", "s1"), ("example.jp", "s_1"),
                                              ("example.jp", "s1\nx"), ("jp", "s1")])
def test_odd_names_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                           domain, selector):
    monkeypatch.chdir(tmp_path)
    code = main(["dkim", "keygen", "--domain", domain, "--selector", selector])
    assert code == 1 and list(tmp_path.iterdir()) == []
    assert "not a" in capsys.readouterr().err


def test_check_refuses_a_key_others_can_read(tmp_path, capsys):
    assert keygen(tmp_path, capsys)[0] == 0
    path = tmp_path / "example.jp.s1.key"
    os.chmod(path, 0o640)
    code = main(["dkim", "check", "--domain", "example.jp", "--selector", "s1", "--key",
                 str(path)])
    assert code == 1 and "mode 0640" in capsys.readouterr().err
