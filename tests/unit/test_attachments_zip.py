"""The attachments ZIP: names Explorer shows right, contents 7-Zip and unzip get back.

Every ZIP here is opened by real tools (p7zip's `7z`, Info-ZIP `unzip`) and its headers are
read byte by byte. p7zip cannot be told a code page when it extracts (-mcp only applies when
it writes) and neither can Debian's unzip 6.0: both write the entry names' bytes to disk as
they are, so the names on disk are read back as bytes and decoded here.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from milters.core.mime.names import (cap_length, encodable, entry_names, safe_name,
                                       unique_names)
from milters.attachments.password import (AMBIGUOUS, DEFAULT_ALPHABET, fixed_password,
                                          generate_password)
from milters.attachments.zipper import ZipEntry, ZipError, write_zip
from milters.core.errors import MailmoatError

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Kx7mR4pWz9aT"
ENCRYPTIONS = ("zipcrypto", "aes256")
CHARSETS = ("cp932", "utf-8")



# -- reading ZIPs the hard way -------------------------------------------------------------
@dataclass(frozen=True)
class RawEntry:
    """One entry as both its local file header and its central directory record say."""
    name: bytes
    local_flags: int
    central_flags: int
    local_method: int
    central_method: int
    local_extra: dict[int, bytes]
    central_extra: dict[int, bytes]

    @property
    def encrypted(self) -> bool:
        return bool(self.local_flags & 1) and bool(self.central_flags & 1)

    @property
    def utf8_flag(self) -> tuple[bool, bool]:
        return bool(self.local_flags & 0x800), bool(self.central_flags & 0x800)


def _extra_fields(blob: bytes) -> dict[int, bytes]:
    fields, pos = {}, 0
    while pos + 4 <= len(blob):
        header_id, size = struct.unpack_from("<HH", blob, pos)
        fields[header_id] = blob[pos + 4:pos + 4 + size]
        pos += 4 + size
    return fields


def read_headers(data: bytes) -> list[RawEntry]:
    """Parse the central directory (from the end record) and each entry's local header."""
    end = data.rindex(b"PK\x05\x06")
    count, _size, offset = struct.unpack_from("<HII", data, end + 10)
    entries = []
    for _ in range(count):
        assert data[offset:offset + 4] == b"PK\x01\x02"
        flags, method = struct.unpack_from("<HH", data, offset + 8)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        (local,) = struct.unpack_from("<I", data, offset + 42)
        name = data[offset + 46:offset + 46 + name_len]
        extra = _extra_fields(data[offset + 46 + name_len:offset + 46 + name_len + extra_len])
        offset += 46 + name_len + extra_len + comment_len

        assert data[local:local + 4] == b"PK\x03\x04"
        local_flags, local_method = struct.unpack_from("<HH", data, local + 6)
        local_name_len, local_extra_len = struct.unpack_from("<HH", data, local + 26)
        assert data[local + 30:local + 30 + local_name_len] == name
        local_extra = _extra_fields(
            data[local + 30 + local_name_len:local + 30 + local_name_len + local_extra_len])
        entries.append(RawEntry(name, local_flags, flags, local_method, method, local_extra,
                                extra))
    return entries


def make_zip(entries: list[ZipEntry], **options: object) -> bytes:
    out = io.BytesIO()
    password = str(options.pop("password", PASSWORD))
    written = write_zip(out, entries, password=password, **options)  # type: ignore[arg-type]
    assert written == len(out.getvalue())
    return out.getvalue()


def extracted(dest: Path) -> dict[bytes, bytes]:
    """Every file under dest by its path relative to dest, in raw bytes as the tool wrote it."""
    found = {}
    for top, _dirs, files in os.walk(os.fsencode(dest)):
        for name in files:
            path = os.path.join(top, name)
            found[os.path.relpath(path, os.fsencode(dest))] = Path(os.fsdecode(path)).read_bytes()
    return found


# The tools run in a UTF-8 locale whatever the test's: under LC_ALL=C unzip writes UTF-8
# names as "#U65e5..." escapes, which says nothing about the ZIP.
TOOL_ENV = {**os.environ, "LC_ALL": "C.UTF-8"}


def run_7z(archive: Path, dest: Path, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["7z", "x", "-y", f"-p{password}", f"-o{dest}", str(archive)],
                          capture_output=True, text=True, errors="replace", timeout=120,
                          env=TOOL_ENV)


def run_unzip(archive: Path, dest: Path, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unzip", "-o", "-P", password, "-d", str(dest), str(archive)],
                          capture_output=True, text=True, errors="replace", timeout=120,
                          env=TOOL_ENV)


def save(tmp_path: Path, data: bytes, name: str = "mail.zip") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- names ---------------------------------------------------------------------------------
# ソ and 表 end in byte 0x5C, the backslash: "ソフト表示.txt" must stay one name.
JAPANESE = ["日本語の資料①.xlsx", "㈱髙橋商事.pdf", "見積書（最終）.docx", "ソフト表示.txt"]
NOT_CP932 = ["😀絵文字.png", "한국어.hwp", "𠮷野家.jpg"]


@pytest.mark.parametrize(("raw", "expected"), [
    ("../../etc/passwd", "passwd"),
    ("C:\\Windows\\x.exe", "x.exe"),
    ("dir/sub\\file.txt", "file.txt"),
    ("a\x00b.txt", "ab.txt"),
    ("tab\there\x7f\x85.txt", "tabhere.txt"),
    ('what<>:"|?*.txt', "what_______.txt"),
    ("  .hidden. . ", "hidden"),
    ("invoice\u202etxt.exe", "invoicetxt.exe"),  # right-to-left override: a display spoof
    ("CON.txt", "_CON.txt"),
    ("con", "_con"),
    ("Com1.tar.gz", "_Com1.tar.gz"),
    ("LPT9.log", "_LPT9.log"),
    ("NUL .txt", "_NUL .txt"),
    ("CONSOLE.txt", "CONSOLE.txt"),
    ("COM10.txt", "COM10.txt"),
    ("....", "attachment"),
    ("..", "attachment"),
    ("", "attachment"),
    ("/", "attachment"),
    ("見積書（最終）.docx", "見積書（最終）.docx"),
])
def test_safe_name(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected


def test_safe_name_fallback_is_configurable() -> None:
    assert safe_name("\x00\x01", fallback="添付") == "添付"


def test_cap_length_keeps_the_extension_and_whole_characters() -> None:
    name = "見" * 120 + ".xlsx"  # 365 bytes in UTF-8, 245 in CP932
    capped = cap_length(name)
    encoded = capped.encode("utf-8")
    assert len(encoded) <= 255 and capped.endswith(".xlsx")
    assert capped == "見" * 83 + ".xlsx"  # 249 + 5 bytes; one more 見 would be 257
    assert cap_length(name, encoding="cp932") == name  # fits as it is
    assert cap_length("あ" * 200 + ".txt", encoding="cp932") == "あ" * 125 + ".txt"


def test_cap_length_odd_budgets_never_split_a_character() -> None:
    for budget in range(5, 40):
        capped = cap_length("漢字" * 30 + ".pdf", max_bytes=budget)
        assert len(capped.encode("utf-8")) <= budget
        assert capped.endswith(".pdf") and set(capped[:-4]) <= {"漢", "字"}


def test_cap_length_long_suffix_is_not_an_extension() -> None:
    name = "a" * 300 + "." + "b" * 30
    capped = cap_length(name)
    assert capped == "a" * 255


def test_cap_length_drops_a_trailing_dot_or_space_left_by_the_cut() -> None:
    assert cap_length("abc. def.txt", max_bytes=8) == "abc.txt"


def test_unique_names_renames_later_duplicates_case_insensitively() -> None:
    names = unique_names(["a.txt", "A.TXT", "a.txt", "a(1).txt", "b"])
    assert names == ["a.txt", "A(2).TXT", "a(3).txt", "a(1).txt", "b"]
    assert len({n.upper() for n in names}) == len(names)


def test_unique_names_compares_like_windows() -> None:
    # Windows upper-cases character by character: ß stays ß, so these are two names.
    assert unique_names(["straße.txt", "STRASSE.txt"]) == ["straße.txt", "STRASSE.txt"]
    assert unique_names(["ä.txt", "Ä.TXT"]) == ["ä.txt", "Ä(1).TXT"]


def test_unique_names_keeps_room_for_the_counter() -> None:
    long = "x" * 251 + ".txt"
    names = unique_names([long, long], max_bytes=255)
    assert names[0] == long
    assert names[1].endswith("(1).txt") and len(names[1].encode()) <= 255


def test_encodable_cp932_matches_windows() -> None:
    for ok in [*JAPANESE, "①②㈱㍻", "髙﨑", "ｱｲｳｴｵ", "～", "plain.txt"]:
        assert encodable(ok, "cp932"), ok
    # One-way mappings (〜 comes back as ～), no JIS equivalent, and private-use single bytes.
    for bad in [*NOT_CP932, "〜", "−", "¢", "\uf8f0", "\x80"]:
        assert not encodable(bad, "cp932"), bad
    for ok in [*JAPANESE, *NOT_CP932, "〜"]:
        assert encodable(ok, "utf-8"), ok
    assert not encodable("bad\udc80", "utf-8")
    with pytest.raises(ValueError):
        encodable("x", "latin-1")


def test_entry_names_aliases_what_cp932_cannot_hold() -> None:
    names = entry_names([*JAPANESE, *NOT_CP932], "cp932")
    assert names == [*JAPANESE, "attachment5.png", "attachment6.hwp", "attachment7.jpg"]
    assert entry_names([*JAPANESE, *NOT_CP932], "utf-8") == [*JAPANESE, *NOT_CP932]


def test_entry_names_alias_drops_an_extension_cp932_cannot_hold() -> None:
    names = entry_names(["資料.한국", "😀"], "cp932", alias="添付{n}{ext}")
    assert names == ["添付1", "添付2"]


def test_entry_names_makes_hostile_names_safe() -> None:
    raw = ["../../etc/passwd", "a\x00b.txt", "C:\\Windows\\x.exe", "CON.txt",
           "n" * 296 + ".txt", "....", "", "report.pdf", "REPORT.PDF", "attachment"]
    names = entry_names(raw, "cp932")
    assert names[:4] == ["passwd", "ab.txt", "x.exe", "_CON.txt"]
    assert names[4] == "n" * 251 + ".txt"
    assert names[5:] == ["attachment", "attachment(1)", "report.pdf", "REPORT(1).PDF",
                         "attachment(2)"]


def test_entry_names_rejects_a_bad_alias() -> None:
    with pytest.raises(ValueError):
        entry_names(["😀.txt"], "cp932", alias="{name}")
    with pytest.raises(ValueError):
        entry_names(["😀.txt"], "cp932", alias="😀{n}")


# -- the ZIP -------------------------------------------------------------------------------
def attachment_set() -> tuple[list[str], list[bytes]]:
    raw = [*JAPANESE, *NOT_CP932, "plain.txt", "empty.dat", "random.bin"]
    contents = [f"{name} の中身\n".encode() * (i + 1) for i, name in enumerate(raw[:-3])]
    contents += [b"plain text\r\n" * 5000, b"", os.urandom(300_000)]
    return raw, contents


@pytest.mark.parametrize("charset", CHARSETS)
@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_7z_extracts_every_entry_with_its_name_and_bytes(tmp_path: Path, encryption: str,
                                                         charset: str) -> None:
    raw, contents = attachment_set()
    names = entry_names(raw, charset)
    archive = save(tmp_path, make_zip([ZipEntry(n, c) for n, c in zip(names, contents)],
                                      encryption=encryption, charset=charset))
    proc = run_7z(archive, tmp_path / "out", PASSWORD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = extracted(tmp_path / "out")
    assert {name.decode(charset): data for name, data in got.items()} == dict(zip(names, contents))
    if charset == "cp932":
        assert names[4:7] == ["attachment5.png", "attachment6.hwp", "attachment7.jpg"]


@pytest.mark.parametrize("charset", CHARSETS)
@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_headers_carry_the_names_flags_and_method(encryption: str, charset: str) -> None:
    names = [*JAPANESE, "plain.txt"]
    headers = read_headers(make_zip([ZipEntry(n, b"x" * 100) for n in names],
                                    encryption=encryption, charset=charset))
    assert [h.name.decode(charset) for h in headers] == names
    for header, name in zip(headers, names):
        assert header.encrypted
        if charset == "cp932":  # Japanese Explorer decodes only unflagged names as CP932
            assert header.utf8_flag == (False, False)
        elif not name.isascii():
            assert header.utf8_flag == (True, True)
        if encryption == "aes256":
            assert header.local_method == header.central_method == 99
            for extra in (header.local_extra, header.central_extra):
                aes = extra[0x9901]
                vendor_version, vendor, strength, method = struct.unpack("<H2sBH", aes)
                assert vendor == b"AE" and vendor_version in (1, 2)
                assert strength == 3  # 256-bit
                assert method == 8  # deflate inside the encryption
        else:
            assert header.local_method == header.central_method == 8
            assert 0x9901 not in header.local_extra and 0x9901 not in header.central_extra


# The bytes Windows itself writes: ㈱ in NEC row 13 (0x878A), 髙 and ⅰ in the IBM
# extension rows (0xFBFC, 0xFA40). Python's codec picks the NEC-selected duplicates (0xEEE0,
# 0xEEEF) instead; Windows decodes both, but the ZIP carries Windows' own choice.
WINDOWS_CP932 = {
    "㈱髙橋商事.pdf": b"\x87\x8a\xfb\xfc\x8b\xb4\x8f\xa4\x8e\x96.pdf",
    "日本語の資料①.xlsx": "日本語の資料".encode("cp932") + b"\x87\x40.xlsx",
    "ⅰ丨.txt": b"\xfa\x40\xfa\x68.txt",
}


def test_cp932_names_are_the_bytes_windows_writes() -> None:
    headers = read_headers(make_zip([ZipEntry(name, b"x") for name in WINDOWS_CP932]))
    assert [h.name for h in headers] == list(WINDOWS_CP932.values())
    assert [h.name.decode("cp932") for h in headers] == list(WINDOWS_CP932)


@pytest.mark.parametrize("charset", CHARSETS)
def test_unzip_extracts_zipcrypto(tmp_path: Path, charset: str) -> None:
    raw, contents = attachment_set()
    names = entry_names(raw, charset)
    archive = save(tmp_path, make_zip([ZipEntry(n, c) for n, c in zip(names, contents)],
                                      encryption="zipcrypto", charset=charset))
    proc = run_unzip(archive, tmp_path / "out", PASSWORD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = extracted(tmp_path / "out")
    assert {name.decode(charset): data for name, data in got.items()} == dict(zip(names, contents))


def test_unzip_refuses_aes(tmp_path: Path) -> None:
    archive = save(tmp_path, make_zip([ZipEntry("secret.txt", b"top secret")],
                                      encryption="aes256"))
    proc = run_unzip(archive, tmp_path / "out", PASSWORD)
    assert proc.returncode != 0
    assert "unsupported compression method 99" in proc.stdout + proc.stderr
    assert b"top secret" not in extracted(tmp_path / "out").values()


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_wrong_password_fails_in_7z(tmp_path: Path, encryption: str) -> None:
    secret = b"confidential figures " * 100
    archive = save(tmp_path, make_zip([ZipEntry("figures.txt", secret)], encryption=encryption))
    proc = run_7z(archive, tmp_path / "out", "not-the-password")
    assert proc.returncode != 0
    assert secret not in extracted(tmp_path / "out").values()
    assert secret not in archive.read_bytes()  # and the plain text is not in the file either


def test_hostile_names_stay_inside_the_extraction_directory(tmp_path: Path) -> None:
    raw = ["../../etc/passwd", "a\x00b.txt", "C:\\Windows\\x.exe", "CON.txt",
           "n" * 296 + ".txt", "....", "", "dup.txt", "DUP.txt", "dup.txt"]
    names = entry_names(raw, "cp932")
    archive = save(tmp_path, make_zip([ZipEntry(n, n.encode()) for n in names]))
    dest = tmp_path / "out"
    assert run_7z(archive, dest, PASSWORD).returncode == 0
    got = extracted(dest)
    assert all(b"/" not in path for path in got)  # no directories, nothing outside
    assert sorted(got) == sorted(n.encode("cp932") for n in names)
    assert all(len(path) <= 255 for path in got)
    assert {p.decode() for p in got} >= {"passwd", "ab.txt", "x.exe", "_CON.txt",
                                          "dup.txt", "DUP(1).txt", "dup(2).txt"}
    assert all(got[n.encode("cp932")] == n.encode() for n in names)


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_zero_byte_file_and_mtime(tmp_path: Path, encryption: str) -> None:
    when = 1_700_000_000.0
    archive = save(tmp_path, make_zip([ZipEntry("empty.txt", b"", mtime=when)],
                                      encryption=encryption))
    assert run_7z(archive, tmp_path / "out", PASSWORD).returncode == 0
    path = tmp_path / "out" / "empty.txt"
    assert path.read_bytes() == b""
    assert path.stat().st_mtime == when


def test_a_hundred_files(tmp_path: Path) -> None:
    files = {f"資料{i:03d}.csv": os.urandom(i * 37) + f"{i}\n".encode() * i for i in range(100)}
    archive = save(tmp_path, make_zip([ZipEntry(n, d) for n, d in files.items()],
                                      encryption="aes256"))
    assert len(read_headers(archive.read_bytes())) == 100
    assert run_7z(archive, tmp_path / "out", PASSWORD).returncode == 0
    got = extracted(tmp_path / "out")
    assert {name.decode("cp932"): data for name, data in got.items()} == files


def test_incompressible_entries_are_stored_and_text_is_deflated(tmp_path: Path) -> None:
    text = "見積書 quotation line\n".encode() * 50_000
    noise = os.urandom(2_000_000)
    data = make_zip([ZipEntry("noise.bin", noise), ZipEntry("text.txt", text)])
    headers = read_headers(data)
    assert [h.local_method for h in headers] == [0, 8]
    assert len(data) < len(noise) + len(text) // 20
    stored = make_zip([ZipEntry("text.txt", text)], level=0)
    assert read_headers(stored)[0].local_method == 0 and len(stored) > len(text)


@pytest.mark.parametrize("options", [
    {"encryption": "aes128"}, {"encryption": "none"}, {"charset": "shift_jis"},
    {"charset": "UTF8"}, {"level": 10}, {"level": -1}, {"password": ""},
    {"password": "パスワード"},
])
def test_bad_options_are_value_errors(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_zip([ZipEntry("a.txt", b"a")], **options)


def test_a_name_outside_the_charset_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="entry_names"):
        make_zip([ZipEntry("😀.txt", b"a")], charset="cp932")


def test_output_errors_become_zip_errors() -> None:
    class Full(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(ZipError) as info:
        write_zip(Full(), [ZipEntry("a.txt", os.urandom(200_000))], password=PASSWORD)
    assert isinstance(info.value, MailmoatError)
    assert isinstance(info.value.__cause__, OSError)
    assert "No space left" in str(info.value)


def _run_python(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cp932_names_do_not_depend_on_the_locale() -> None:
    """Under LC_ALL=C libarchive would write the UTF-8 bytes unconverted, without a word."""
    out = _run_python(
        "import io, locale, json\n"
        "from milters.attachments.zipper import write_zip, ZipEntry\n"
        "before = locale.nl_langinfo(locale.CODESET)\n"
        "for charset in ('cp932', 'utf-8'):\n"
        "    buf = io.BytesIO()\n"
        "    write_zip(buf, [ZipEntry('㈱髙橋商事.pdf', b'x')], password='pw12', charset=charset)\n"
        "    print(json.dumps([charset, buf.getvalue().hex()]))\n"
        "print(json.dumps([before, locale.nl_langinfo(locale.CODESET)]))\n",
        env={"LC_ALL": "C"})
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1] == ["ANSI_X3.4-1968", "ANSI_X3.4-1968"]  # the test's premise; restored
    for charset, hexdata in lines[:-1]:
        header = read_headers(bytes.fromhex(hexdata))[0]
        assert header.name == ("㈱髙橋商事.pdf".encode() if charset == "utf-8"
                               else WINDOWS_CP932["㈱髙橋商事.pdf"])
        assert header.utf8_flag == ((False, False) if charset == "cp932" else (True, True))


@pytest.mark.parametrize("spool", ["memory", "disk"])
def test_a_20_mb_attachment_needs_under_3x_its_size(spool: str) -> None:
    """Peak RSS growth of a fresh process zipping 20 MB of incompressible data into a
    SpooledTemporaryFile, as the milter does; the data itself counts as the first 1x.

    The peak is VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over execve, so
    a child of this (large) pytest process would start at pytest's peak and hide its own.
    """
    size = 20 * 1024 * 1024
    max_size = 64 * 1024 * 1024 if spool == "memory" else 1024 * 1024
    out = _run_python(
        "import io, os, re, tempfile\n"
        "from milters.attachments.zipper import write_zip, ZipEntry\n"
        "def hwm():\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024\n"
        "write_zip(io.BytesIO(), [ZipEntry('warm.txt', b'x' * 1000)], password='pw12')\n"
        "base = hwm()\n"
        f"data = os.urandom({size})\n"
        f"out = tempfile.SpooledTemporaryFile(max_size={max_size})\n"
        "n = write_zip(out, [ZipEntry('big.bin', data)], password='pw12')\n"
        "print(n, out._rolled, hwm() - base)\n")
    written, rolled, growth = out.split()
    assert int(written) > size
    assert rolled == ("True" if spool == "disk" else "False")
    assert int(growth) < 3 * size, f"grew {int(growth) / size:.2f}x"
    if spool == "disk":  # then the data itself should be about all there is
        assert int(growth) < 1.5 * size, f"grew {int(growth) / size:.2f}x"


# -- passwords -----------------------------------------------------------------------------
def test_generated_password_length_alphabet_and_classes() -> None:
    allowed = set(DEFAULT_ALPHABET) - set(AMBIGUOUS)
    for length in (4, 12, 40):
        for _ in range(200):
            password = generate_password(length)
            assert len(password) == length
            assert set(password) <= allowed
            assert any(c.isdigit() for c in password) and any(c.isalpha() for c in password)


def test_ambiguous_characters_are_left_out_unless_asked_for() -> None:
    assert set("lI1O0o") <= set(AMBIGUOUS)
    drawn = "".join(generate_password(40) for _ in range(200))
    assert not set(drawn) & set(AMBIGUOUS)
    assert set(generate_password(4, "0O", exclude_ambiguous=False)) == {"0", "O"}
    assert set(generate_password(8, "0123456789")) <= set("3479")


def test_passwords_are_all_different() -> None:
    assert len({generate_password() for _ in range(1000)}) == 1000


def test_the_digit_and_letter_guarantee_does_not_bias_positions() -> None:
    # Over "a1" with 4 characters, 14 of the 16 strings have both classes; drawn uniformly
    # from those 14, every position is "a" half of the time. Patching a position would not.
    drawn = [generate_password(4, "a1", exclude_ambiguous=False) for _ in range(4000)]
    assert len(set(drawn)) == 14
    for position in range(4):
        count = Counter(p[position] for p in drawn)["a"]
        assert abs(count - 2000) < 160, (position, count)  # 5 standard deviations


@pytest.mark.parametrize(("length", "alphabet"), [(3, DEFAULT_ALPHABET), (0, "ab"),
                                                   (8, ""), (8, "0O1lI")])
def test_generate_password_rejects(length: int, alphabet: str) -> None:
    with pytest.raises(ValueError):
        generate_password(length, alphabet)


@pytest.mark.parametrize(("pattern", "expected"), [
    ("pass%Y%m", "pass202603"),
    ("%Y-%m-%d_%H%M%S", "2026-03-05_091507"),
    ("100%%%d", "100%05"),
    ("%y%j", "26064"),
    ("fixed-secret", "fixed-secret"),
])
def test_fixed_password(pattern: str, expected: str) -> None:
    assert fixed_password(pattern, datetime(2026, 3, 5, 9, 15, 7)) == expected


@pytest.mark.parametrize("pattern", ["%B%Y", "pass%c", "%s", "pass%", "%-m", "%Z", "パス%Y",
                                     ""])
def test_fixed_password_rejects(pattern: str) -> None:
    with pytest.raises(ValueError):
        fixed_password(pattern, datetime(2026, 3, 5))
