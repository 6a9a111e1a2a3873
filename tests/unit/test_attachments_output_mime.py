"""What the attachments milter writes is valid MIME, whatever came in: exactly one of each
top-level MIME header (inputs starting with a UTF-8 BOM, with a broken fold, with the header
twice), no multipart left with zero parts, no stray delimiter, headers and body where they
belong; every output re-parses with the stdlib with no defect the input did not have. Fixed
cases, then mangled MIME trees from hypothesis, each also checked fail-closed (its files in
the ZIP, opened with 7z, none in the clear)."""
from __future__ import annotations

import email
import re
import tempfile
from email import policy as email_policy
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milters.core.mime.scan import scan
from milters.core.mime.stream import EMPTIED, NewPart, copy_header, rebuild
from tests.harness.attfail_cases import (HEAD, Case, Hidden, _b64, _file, _uu,
                                         check_protected, notice_password)
from tests.unit.test_attachments_failclosed import run

NOTE = NewPart(b"Content-Type: text/plain; charset=us-ascii\r\n\r\nremoved\r\n")
MIME_HEADERS = ("mime-version", "content-type", "content-transfer-encoding")


def defects(raw: bytes) -> set[str]:
    message = email.message_from_bytes(raw, policy=email_policy.default)
    return {type(d).__name__ for part in message.walk() for d in part.defects}


def check_valid(source: bytes, out: bytes) -> None:
    message = email.message_from_bytes(out, policy=email_policy.default)
    new = defects(out) - defects(source)
    assert not new, (new, out[:3000])
    names = [name.lower() for name in message.keys()]
    for name in MIME_HEADERS:
        assert names.count(name) <= 1, (name, names)
    assert names.count("mime-version") == 1 and names.count("content-type") == 1, names
    for part in message.walk():
        if part.get_content_maintype() == "multipart":
            payload = part.get_payload()
            assert isinstance(payload, list) and payload, "a multipart with no parts"
    # No stray delimiter: every line starting with "--" + a boundary of the output belongs
    # to the multipart that declares it (the stdlib would count a defect otherwise), and no
    # body line went into the top-level header block.
    head = out.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        assert line[:1] in b" \t" or b":" in line, line


FILE = _file(5)
PART = (b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\n"
        b"Content-Type: application/octet-stream; name=a.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(FILE) + b"--b--\r\n")
FIXED = [
    Case("utf8-bom", b"\xef\xbb\xbf" + HEAD.replace(b"MIME-Version: 1.0\r\n", b"")
         .replace(b"From:", b"MIME-Version: 1.0\r\nFrom:")
         + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + PART,
         (Hidden(_b64(FILE), FILE),)),
    Case("broken-fold", HEAD + b"Content-Type: multipart/mixed;\r\nboundary=b\r\n\r\n" + PART,
         (Hidden(_b64(FILE), FILE),)),
    Case("mime-headers-twice", HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
         b" boundary=b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + PART,
         (Hidden(_b64(FILE), FILE),)),
    # Only MIME-Version twice: the structure is sound, the multipart kept and added to.
    Case("mime-version-twice", HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
         b" boundary=b\r\n\r\n" + PART, (Hidden(_b64(FILE), FILE),)),
]


_POSTFIX_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def postfix_view(raw: bytes) -> bytes:
    """The message as a milter behind Postfix gets it: Postfix's own Received first, the
    header section ending at the first line that is not a field (is_header(); a BOM line is
    not one), the rest body after the blank line the milter library puts between."""
    at, fields = 0, [b"Received: from client by mx.example.jp; Sat, 28 Nov 2026\r\n"]
    while (found := _POSTFIX_FIELD.match(raw, at)) is not None:
        fields.append(found.group(0))
        at = found.end()
    body = raw[at + 2:] if raw[at:at + 2] == b"\r\n" else raw[at:]
    return b"".join(fields) + b"\r\n" + body


def test_fixed_cases_give_valid_mime_with_their_files_protected(tmp_path: Path) -> None:
    """In place (the edits applied by the MTA's applier), as Postfix hands the message."""
    for n, case in enumerate(FIXED):
        source = postfix_view(case.raw)
        verdict, out, sent = run(source)
        assert out is not None, case.name
        check_valid(source, out)
        check_protected(case, out, notice_password(sent[0]), tmp_path / str(n))


def test_a_reinjected_copy_has_one_of_each_mime_header() -> None:
    """The copy's header section (copy_header): a BOM, a broken fold, a repeated field."""
    for case in FIXED:
        head = copy_header(case.raw, {"MIME-Version": "1.0", "Content-Type": "text/plain",
                                      "Content-Transfer-Encoding": None}, [])
        names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n") if line
                 and line[:1] not in b" \t"]
        assert names.count(b"mime-version") == 1 and names.count(b"content-type") == 1, \
            (case.name, head)
        assert b"content-transfer-encoding" not in names
        assert b"\xef\xbb\xbf" not in head and b"boundary=b\r\n" not in head, head


def test_a_multipart_losing_every_part_becomes_a_note() -> None:
    """Nested multipart/mixed whose two files both go: the inner multipart is replaced by
    a short text part, not left with zero parts; also when the root loses everything."""
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n"
           b"Content-Type: text/plain\r\n\r\nbody\r\n--o\r\n"
           b"Content-Type: multipart/mixed; boundary=i\r\n\r\n--i\r\n"
           b"Content-Type: application/pdf\r\n\r\nA\r\n--i\r\n"
           b"Content-Type: application/pdf\r\n\r\nB\r\n--i--\r\n--o--\r\n")
    root = scan(raw)
    inner = root.children[1]
    rebuilt = rebuild(raw, root, list(inner.children), [])
    out = copy_header(raw, rebuilt.mime_headers, []) + rebuilt.body.read()
    check_valid(raw, out)
    assert EMPTIED.body in out  # type: ignore[operator]
    # The root's every part removed, nothing added: a note, not an empty multipart.
    rebuilt = rebuild(raw, root, list(root.children), [])
    out = copy_header(raw, rebuilt.mime_headers, []) + rebuilt.body.read()
    check_valid(raw, out)
    assert b"body\r\n" not in out and EMPTIED.body in out  # type: ignore[operator]


# -- mangled MIME trees ---------------------------------------------------------------------
@st.composite
def mangled(draw: st.DrawFn) -> Case:
    hidden: list[Hidden] = []
    counter = [0]

    def leaf(depth: int) -> bytes:
        counter[0] += 1
        kind = draw(st.sampled_from(["text", "file", "uu", "odd-cte", "no-blank", "dup-ct"]))
        if depth == 0 and kind == "no-blank":
            # At the top, Postfix ends the header at the base64 line: a valid text/plain
            # message whose body is that text, not a hidden file.
            kind = "file"
        data = _file(counter[0] + 10)
        if kind == "text":
            return b"Content-Type: text/plain\r\n\r\nsome words\r\n"
        hidden.append(Hidden(_uu("f.bin", data) if kind in ("uu", "odd-cte")
                             else _b64(data), data))
        if kind == "file":
            return (b"Content-Type: application/octet-stream; name=f.bin\r\n"
                    b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(data))
        if kind == "uu":
            return b"Content-Type: text/plain\r\n\r\n" + _uu("f.bin", data)
        if kind == "odd-cte":
            return (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uue\r\n\r\n"
                    + _uu("f.bin", data))
        if kind == "no-blank":
            return (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
                    + _b64(data))
        return (b"Content-Type: text/plain\r\nContent-Type: application/x-msdownload\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(data))

    def node(depth: int) -> bytes:
        if depth >= 3 or draw(st.booleans()):
            return leaf(depth)
        boundary = f"b{depth}x{draw(st.integers(0, 9))}".encode()
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"related"]))
        children = [node(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        mangle = draw(st.sampled_from(["none", "none", "no-close", "no-open", "no-boundary"]))
        ctype = b"Content-Type: multipart/" + subtype + (
            b"" if mangle == "no-boundary" else b"; boundary=" + boundary) + b"\r\n\r\n"
        dash = b"--" + (b"zz" if mangle == "no-open" else boundary)
        body = b"".join(dash + b"\r\n" + child for child in children)
        if mangle != "no-close":
            body += b"--" + boundary + b"--\r\n"
        return ctype + body

    tree = node(0)
    top = draw(st.sampled_from(["plain", "bom", "broken-fold", "dup-mime"]))
    head = HEAD
    if top == "bom":
        head = b"\xef\xbb\xbf" + head
    elif top == "broken-fold":
        tree = tree.replace(b"; boundary=", b";\r\nboundary=", 1)
    elif top == "dup-mime":
        head += b"MIME-Version: 1.0\r\n"
    return Case(f"mangled-{top}", head + tree, tuple(hidden))


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mangled())
def test_mangled_trees_give_valid_mime_and_protect_their_files(case: Case) -> None:
    source = postfix_view(case.raw)
    verdict, out, sent = run(source)
    if out is None:  # nothing to protect: passed as it came
        assert not case.hidden, case.raw
        return
    check_valid(source, out)
    if case.hidden:
        with tempfile.TemporaryDirectory() as tmp:
            check_protected(case, out, notice_password(sent[0]), Path(tmp))


