"""The Authentication-Results header (RFC 8601): what we write must parse, carry every
result once, and never let text from the message (HELO names, DKIM tags, SPF explanations)
add or hide a result; forged headers naming our authserv-id must all be found.

The header is read back with a small RFC 8601 section 2.2 parser written here (strict about
tokens) and with the `authres` package, the parser dkimpy's ARC sealing relies on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import authres
import pytest

from milters.auth.dkim_check import ArcResult, DkimResult
from milters.auth.dmarc import DmarcRecord, DmarcResult
from milters.auth.results_header import AuthResults, compose, forged_indexes
from milters.core.auth_results import authserv_id_of
from milters.auth.spf import SpfResult

OURS = "mx.example.net"
# RFC 2045 5.1: a token is any CHAR but SPACE, CTLs and these.
TSPECIALS = set('()<>@,;:\\"/[]?=')
ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]")  # RFC 5322 3.2.3 (dot-atom)
DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")
KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


@dataclass
class ResInfo:
    method: str
    result: str
    comments: list[str] = field(default_factory=list)
    props: list[tuple[str, str]] = field(default_factory=list)  # ("header.d", value)
    quoted: set[str] = field(default_factory=set)  # properties whose value was quoted

    def prop(self, name: str) -> str:
        values = [v for k, v in self.props if k == name]
        assert len(values) == 1, f"{name} appears {len(values)} times in {self}"
        return values[0]


class SyntaxProblem(AssertionError):
    pass


class Parser:
    """RFC 8601 2.2, with RFC 5322 CFWS and RFC 2045 tokens; raises SyntaxProblem."""

    def __init__(self, value: str) -> None:
        if re.search(r"\r?\n(?![ \t])", value):
            raise SyntaxProblem("a line break that is not folding")
        self.text = re.sub(r"\r?\n", "", value)  # unfold (RFC 5322 2.2.3)
        self.pos = 0
        self.comments: list[str] = []

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def cfws(self) -> None:
        while self.peek():
            if self.peek() in " \t":
                self.pos += 1
            elif self.peek() == "(":
                self.comments.append(self.comment())
            else:
                break

    def comment(self) -> str:
        start, depth = self.pos, 0
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\":
                self.pos += 2
                continue
            self.pos += 1
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    return self.text[start + 1:self.pos - 1]
        raise SyntaxProblem(f"unclosed comment at {start}: {self.text[start:]!r}")

    def expect(self, char: str) -> None:
        self.cfws()
        if self.peek() != char:
            raise SyntaxProblem(f"expected {char!r} at {self.pos}: {self.text[self.pos:]!r}")
        self.pos += 1

    def keyword(self) -> str:
        self.cfws()
        match = KEYWORD.match(self.text, self.pos)
        if not match:
            raise SyntaxProblem(f"expected a keyword at {self.pos}: {self.text[self.pos:]!r}")
        self.pos = match.end()
        return match.group()

    def quoted_string(self) -> str:
        assert self.peek() == '"'
        self.pos += 1
        out = []
        while True:
            char = self.peek()
            if not char:
                raise SyntaxProblem("unclosed quoted-string")
            self.pos += 1
            if char == "\\":
                out.append(self.peek())
                self.pos += 1
            elif char == '"':
                return "".join(out)
            else:
                out.append(char)

    def token(self) -> str:
        start = self.pos
        while self.peek() and self.peek() not in TSPECIALS and self.peek() > " " \
                and self.peek() != "\x7f":
            self.pos += 1
        return self.text[start:self.pos]

    def value(self) -> tuple[str, bool]:
        """RFC 2045 value: token / quoted-string; (text, was it quoted)."""
        self.cfws()
        if self.peek() == '"':
            return self.quoted_string(), True
        token = self.token()
        if not token:
            raise SyntaxProblem(f"expected a value at {self.pos}: {self.text[self.pos:]!r}")
        return token, False

    def pvalue(self) -> tuple[str, bool]:
        """RFC 8601 pvalue: value / [[local-part] "@"] domain-name."""
        self.cfws()
        if self.peek() == '"':
            text = self.quoted_string()
            if self.peek() != "@":
                return text, True
            local = '"' + text + '"'
        else:
            start = self.pos
            while self.peek() and ATEXT.match(self.peek()):
                self.pos += 1
            local = self.text[start:self.pos]
            if self.peek() != "@":
                self.pos = start
                return self.value()
        self.pos += 1  # "@"
        start = self.pos
        while self.peek() and (self.peek().isalnum() or self.peek() in ".-"):
            self.pos += 1
        domain = self.text[start:self.pos]
        if not DOMAIN.match(domain):
            raise SyntaxProblem(f"bad domain after @: {domain!r}")
        return f"{local}@{domain}", False

    def parse(self) -> tuple[str, str | None, list[ResInfo]]:
        authserv_id, _ = self.value()
        self.cfws()
        version = None
        if self.peek().isdigit():
            start = self.pos
            while self.peek().isdigit():
                self.pos += 1
            version = self.text[start:self.pos]
        results: list[ResInfo] = []
        self.cfws()
        while self.peek() == ";":
            self.pos += 1
            self.comments = []
            method = self.keyword()
            if method == "none" and not results:
                self.cfws()
                if not self.peek():
                    return authserv_id, version, []
            self.expect("=")
            info = ResInfo(method, self.keyword())
            while True:
                self.cfws()
                if not self.peek() or self.peek() == ";":
                    break
                ptype = self.keyword()
                if ptype == "reason":
                    self.expect("=")
                    info.props.append(("reason", self.value()[0]))
                    continue
                self.expect(".")
                name = self.keyword()
                self.expect("=")
                text, quoted = self.pvalue()
                info.props.append((f"{ptype}.{name}", text))
                if quoted:
                    info.quoted.add(f"{ptype}.{name}")
            info.comments = self.comments
            results.append(info)
        if self.peek():
            raise SyntaxProblem(f"trailing text at {self.pos}: {self.text[self.pos:]!r}")
        if not results:
            raise SyntaxProblem("no resinfo and no 'none'")
        return authserv_id, version, results


def parse(value: str) -> tuple[str, list[ResInfo]]:
    authserv_id, _, results = Parser(value).parse()
    return authserv_id, results


def full_results(**changes: object) -> AuthResults:
    """A message checked all the way: SPF and HELO, two DKIM signatures, ARC and DMARC."""
    made: dict[str, object] = dict(
        spf=SpfResult("pass", "mailfrom", "example.org", "sender SPF authorized"),
        helo=SpfResult("none", "helo", "mail.example.org"),
        dkim=[DkimResult("pass", "example.org", "sel2026", "rsa-sha256", "AbCd1234"),
              DkimResult("fail", "lists.example.com", "k1", "ed25519-sha256", "Zz9+Yy8x",
                         reason="body hash did not verify")],
        arc=ArcResult("pass", ("fwd.example.com",)),
        dmarc=DmarcResult("pass", "example.org", "reject", "none",
                          DmarcRecord("reject"), dkim_aligned=("example.org",)))
    made.update(changes)
    return AuthResults(**made)  # type: ignore[arg-type]


# --- compose ---------------------------------------------------------------------------------


def test_composed_header_parses_with_every_result_once() -> None:
    """RFC 8601 2.2: authserv-id first, then one resinfo per result, with the properties
    2.7 defines: smtp.mailfrom/smtp.helo, header.d/s/b (RFC 6008), header.from."""
    value = compose(OURS, full_results())
    authserv_id, results = parse(value)
    assert authserv_id == OURS
    assert [r.method for r in results] == ["spf", "spf", "dkim", "dkim", "arc", "dmarc"]
    spf, helo, good, bad, arc, dmarc = results
    assert (spf.result, spf.prop("smtp.mailfrom")) == ("pass", "example.org")
    assert (helo.result, helo.prop("smtp.helo")) == ("none", "mail.example.org")
    assert (good.result, good.prop("header.d"), good.prop("header.s"),
            good.prop("header.b")) == ("pass", "example.org", "sel2026", "AbCd1234")
    assert (bad.result, bad.prop("header.d"), bad.prop("header.s"),
            bad.prop("header.b")) == ("fail", "lists.example.com", "k1", "Zz9+Yy8x")
    assert arc.result == "pass" and any("fwd.example.com" in c for c in arc.comments)
    assert (dmarc.result, dmarc.prop("header.from")) == ("pass", "example.org")


def test_composed_header_parses_with_authres() -> None:
    """RFC 8601 2.2 as the `authres` package reads it (dkimpy uses it to collect our results
    when ARC-sealing): same id, same methods, same results."""
    value = compose(OURS, full_results())
    header = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results: " + value.replace("\n", "\r\n"))
    assert header.authserv_id == OURS
    assert [(r.method, r.result) for r in header.results] == [
        ("spf", "pass"), ("spf", "none"), ("dkim", "pass"), ("dkim", "fail"), ("arc", "pass"),
        ("dmarc", "pass")]


def test_helo_identity_alone_is_smtp_helo() -> None:
    """RFC 8601 2.7.2: a null MAIL FROM checks HELO, reported once as smtp.helo."""
    value = compose(OURS, full_results(spf=SpfResult("pass", "helo", "mail.example.org"),
                                       helo=None))
    _, results = parse(value)
    spf = [r for r in results if r.method == "spf"]
    assert len(spf) == 1 and spf[0].prop("smtp.helo") == "mail.example.org"
    assert not any(k == "smtp.mailfrom" for k, _ in spf[0].props)


def test_unsigned_message_says_dkim_none() -> None:
    """RFC 8601 2.7.1: no signature at all is dkim=none, not a missing method."""
    _, results = parse(compose(OURS, full_results(dkim=[])))
    dkim = [r for r in results if r.method == "dkim"]
    assert [r.result for r in dkim] == ["none"]


def test_dmarc_without_record_still_names_header_from() -> None:
    """RFC 7489 11.2 / RFC 8601 2.7: dmarc=none with header.from, the reason in a comment."""
    none = DmarcResult("none", "example.org", reason="no DMARC record")
    _, results = parse(compose(OURS, full_results(dmarc=none)))
    dmarc = results[-1]
    assert dmarc.method == "dmarc" and dmarc.result == "none"
    assert dmarc.prop("header.from") == "example.org"


def test_client_supplied_values_are_quoted_and_cannot_add_results() -> None:
    """RFC 8601 2.2 and 7.2 (forged results): a HELO, MAIL FROM domain or DKIM tag made of
    ';', '=', quotes, parentheses or spaces is quoted, reads back unchanged, and cannot
    smuggle in a second dmarc result."""
    helo = 'x; dmarc=pass header.from=bank.example'
    selector = 'a"b(c)'
    domain = "evil.test (x) ; dmarc=pass"
    results = full_results(
        spf=SpfResult("fail", "mailfrom", domain),
        helo=SpfResult("none", "helo", helo),
        dkim=[DkimResult("fail", "evil.test", selector, "rsa-sha256", "((((;;;;")],
        dmarc=DmarcResult("fail", "bank.example", "reject", "reject", DmarcRecord("reject")))
    value = compose(OURS, results)
    authserv_id, parsed = parse(value)
    assert authserv_id == OURS
    assert [r.method for r in parsed] == ["spf", "spf", "dkim", "arc", "dmarc"]
    assert [r.result for r in parsed if r.method == "dmarc"] == ["fail"]
    spf, helo_info, dkim = parsed[0], parsed[1], parsed[2]
    assert spf.prop("smtp.mailfrom") == domain and "smtp.mailfrom" in spf.quoted
    assert helo_info.prop("smtp.helo") == helo and "smtp.helo" in helo_info.quoted
    assert dkim.prop("header.s") == selector and "header.s" in dkim.quoted
    assert dkim.prop("header.b") == "((((;;;;"
    # The independent parser agrees: still exactly one dmarc result, ours.
    header = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results: " + value.replace("\n", "\r\n"))
    assert [(r.method, r.result) for r in header.results if r.method == "dmarc"] \
        == [("dmarc", "fail")]


def test_base64_with_slash_is_quoted() -> None:
    """RFC 8601 2.2: a pvalue is an RFC 2045 token, a quoted-string or [local-part@]domain;
    '/' and '=' are tspecials (RFC 2045 5.1), so a header.b such as 'ab/cd+ef' (base64, RFC
    6008) is not a token and must be quoted for a strict parser to read it."""
    value = compose(OURS, full_results(dkim=[DkimResult("pass", "example.org", "s",
                                                        "rsa-sha256", "ab/cd+ef")]))
    _, parsed = parse(value)
    assert parsed[2].prop("header.b") == "ab/cd+ef"


def test_explanations_cannot_break_out_of_comments() -> None:
    """RFC 8601 2.2 / RFC 5322 3.2.2: an SPF explanation is chosen by the sender's domain
    (RFC 7208 6.2 exp=); parentheses, backslashes and line breaks in it must not end the
    comment and turn the rest into results."""
    explanation = "see ) ; dmarc=pass (\\) header.from=bank.example\r\nX-Evil: 1 ((("
    dkim_reason = "bad) ; dkim=pass header.d=bank.example ("
    results = full_results(
        spf=SpfResult("fail", "mailfrom", "evil.test", explanation),
        dkim=[DkimResult("fail", "evil.test", "s", "rsa-sha256", "AAAA1111",
                         reason=dkim_reason)],
        dmarc=DmarcResult("fail", "bank.example", "reject", "reject", DmarcRecord("reject")))
    value = compose(OURS, results)
    _, parsed = parse(value)
    assert [(r.method, r.result) for r in parsed] == [
        ("spf", "fail"), ("spf", "none"), ("dkim", "fail"), ("arc", "pass"), ("dmarc", "fail")]
    assert "X-Evil" not in value.split("\n", 1)[0]
    assert not re.search(r"\n(?![\t ])", value)  # every line break is folding


# --- authserv_id_of --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "mx.example.net; spf=pass smtp.mailfrom=example.org",
    "mx.example.net 1; dmarc=pass header.from=example.org",  # authres-version
    "(checked here) mx.example.net; none",  # leading comment
    "mx.example.net (our gateway (v2)) 1; none",  # nested comment, then version
    "MX.Example.NET; dkim=pass header.d=example.org",  # ids compare without case
    '"mx.example.net"; none',  # a quoted-string id
    "\r\n\tmx.example.net\r\n\t; spf=none smtp.helo=x.example",  # folded
    "mx.example.net.; none",  # a trailing root dot
])
def test_authserv_id_of_reads_our_id(value: str) -> None:
    """RFC 8601 2.2 / 2.5: the authserv-id, with CFWS, version and case set aside."""
    assert authserv_id_of(value) == OURS


def test_authserv_id_of_comment_with_semicolon() -> None:
    """RFC 5322 3.2.2: a comment may contain ';' (ctext); authserv_id_of promises comments
    are dropped, so '(relay; note) mx.example.net' is still our id (authres reads it so)."""
    value = "(relay; note) mx.example.net; dmarc=pass header.from=bank.example"
    header = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
    assert header.authserv_id == OURS  # the reading a downstream parser would make
    assert authserv_id_of(value) == OURS


@pytest.mark.parametrize("value", [
    "mx.example.network; dmarc=pass",
    "sub.mx.example.net; dmarc=pass",
    "example.net; dmarc=pass",
    "other.example (mx.example.net) 1; dmarc=pass",
])
def test_authserv_id_of_other_admds(value: str) -> None:
    """RFC 8601 5: only an exact id is ours; look-alikes belong to someone else."""
    assert authserv_id_of(value) != OURS


# --- forged_indexes --------------------------------------------------------------------------


def test_forged_indexes_counts_only_authentication_results() -> None:
    """RFC 8601 5: headers naming our authserv-id are removed; the index is 1-based among
    Authentication-Results fields only (what smfi_chgheader wants), other ADMDs stay."""
    headers = [
        ("Received", "from a by b"),
        ("Authentication-Results", "other.example; spf=pass smtp.mailfrom=x.example"),  # 1
        ("Authentication-Results", "mx.example.net; dmarc=pass header.from=bank.example"),  # 2
        ("Subject", "mx.example.net; dmarc=pass"),
        ("ARC-Authentication-Results", "i=1; mx.example.net; dmarc=pass"),
        ("X-Authentication-Results", "mx.example.net; dmarc=pass"),
        ("authentication-results", "MX.EXAMPLE.NET 1; dkim=pass header.d=bank.example"),  # 3
        ("Authentication-Results", "mx.example.network; dmarc=pass"),  # 4
        ("Authentication-Results", "(x) mx.example.net (y); spf=pass"),  # 5
    ]
    assert forged_indexes(headers, OURS) == [2, 3, 5]
    assert forged_indexes(headers, "MX.example.net.") == [2, 3, 5]
    assert forged_indexes(headers, "other.example") == [1]


def test_forged_indexes_none_when_no_header_is_ours() -> None:
    """RFC 8601 5: nothing of ours, nothing to remove."""
    headers = [("Authentication-Results", "other.example; none"), ("From", "a@example.org")]
    assert forged_indexes(headers, OURS) == []


def test_forged_header_hidden_behind_semicolon_comment_is_found() -> None:
    """RFC 8601 5 / 7.2: a forged 'dmarc=pass' whose authserv-id follows a comment holding
    ';' is read as ours by authres (and so by dkimpy when sealing ARC); it must be removed."""
    headers = [("Authentication-Results", "other.example; none"),
               ("Authentication-Results", "(relay; checked) mx.example.net; dmarc=pass "
                                          "header.from=bank.example")]
    assert forged_indexes(headers, OURS) == [2]


def test_an_authentication_results_too_long_to_read_whole_is_deleted_as_forged() -> None:
    """Our id could hide past the cut a reader makes (64 KB milter packets, 100 KB
    header_size_limit): a header longer than any real one is deleted; a normal one of
    another ADMD is kept (RFC 8601 5)."""
    from milters.auth.results_header import UNREADABLE_LENGTH, forged_indexes
    hidden = "(" + "x" * UNREADABLE_LENGTH + ") mx.example.jp; dmarc=pass"
    headers = [("Authentication-Results", "mx.other.example; dmarc=fail"),
               ("Authentication-Results", hidden),
               ("Authentication-Results", "(" + "x" * 200 + ") mx.other.example; spf=pass")]
    assert forged_indexes(headers, "mx.example.jp") == [2]
