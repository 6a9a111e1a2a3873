"""Our DMARC verdicts next to OpenDMARC's (Debian's opendmarc, fed DKIM results by Debian's
opendkim), on the same messages, through one private Postfix, against one Knot DNS.

Where OpenDMARC follows RFC 7489 the two agree; every difference is pinned here with the
RFC section that decides it, so a change on either side shows up.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import dkim
import publicsuffixlist
import pytest

from milters.core import auth_results

from tests.harness.dns_server import KnotServer
from tests.harness.milter_proc import MilterProcess
from tests.harness.opendmarc import OpenDkimVerifier, OpenDmarc
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.auth_world import (AUTHSERV_ID, GOOD_IP, STRANGER_IP, Keys, make_keys,
                                          message, sign_opendkim, sign_rsa, zones)

pytestmark = pytest.mark.integration

# Both sides find organisational domains in the same list: the one our package ships.
SUFFIX_LIST = Path(publicsuffixlist.__file__).with_name("public_suffix_list.dat")
PEER_ID = "peer.test"  # OpenDKIM's and OpenDMARC's authserv-id
NO_VERDICT = "(no dmarc= header)"
# Ours only tags here: every message reaches the sink with both verdicts in its header.
POLICY = """\
internal_networks: [127.0.0.0/8]
auth:
  dmarc: {actions: {reject: tag, quarantine: tag, none: tag}}
  on_temperror: tag
"""
EXTRA_ZONES = {
    "soft.test": ['@ 300 IN TXT "v=spf1 ~all"', '_dmarc 300 IN TXT "v=DMARC1; p=reject"'],
    "org.test": ['@ 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
                 'sub 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
                 '_dmarc 300 IN TXT "v=DMARC1; p=none; sp=reject"'],
    "tworec.test": ['@ 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
                    '_dmarc 300 IN TXT "v=DMARC1; p=reject"',
                    '_dmarc 300 IN TXT "v=DMARC1; p=none"'],
    "spfbroken.test": ['@ 300 IN TXT "v=spf1 ip4:192.0.2.300 -all"',
                       '_dmarc 300 IN TXT "v=DMARC1; p=reject"'],
    "strict.test": ['@ 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
                    'mail 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
                    '_dmarc 300 IN TXT "v=DMARC1; p=reject; aspf=s"'],
}


@dataclass
class Side:
    dmarc: str  # dmarc=... result
    header: str


@dataclass
class Lab:
    postfix: PostfixInstance
    sink: SmtpSink
    keys: Keys
    workdir: Path
    ours: MilterProcess


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("vs-opendmarc")
    keys = make_keys(workdir / "keys")
    with KnotServer({**zones(keys), **EXTRA_ZONES}, workdir) as dns, \
            OpenDkimVerifier(dns, workdir, authserv_id=PEER_ID) as opendkim, \
            OpenDmarc(dns, workdir, authserv_id=PEER_ID, trusted_authserv_ids=[PEER_ID],
                      public_suffix_list=SUFFIX_LIST) as opendmarc:
        (workdir / "policy.yaml").write_text(POLICY)
        config = workdir / "config.yaml"
        config.write_text(f"gateway: {{hostname: {AUTHSERV_ID}}}\nstore: memory://\n"
                          f"policy: policy.yaml\n"
                          f"dns: {{nameservers: [\"{dns.nameserver}\"], timeout: 2s}}\n")
        ours = MilterProcess("auth", config, workdir).start()
        try:
            # OpenDKIM first, so that OpenDMARC reads its dkim= results (Postfix shows each
            # milter the headers the earlier ones added).
            milters = f"{opendkim.socket_spec} {opendmarc.socket_spec} {ours.socket_spec}"
            with SmtpSink() as sink, postfix_instance(
                    workdir, relay_port=sink.port, smtpd_milters=milters,
                    extra={"local_header_rewrite_clients": ""}) as postfix:
                yield Lab(postfix, sink, keys, workdir, ours)
        finally:
            ours.stop()


def verdicts(lab: Lab, raw: bytes, client: str, mail_from: str) -> tuple[Side, Side]:
    path = lab.workdir / "case.eml"
    path.write_bytes(raw)
    before = len(lab.sink.messages)
    result = run_swaks(lab.postfix.smtp_port, mail_from=mail_from, rcpt="taro@example.jp",
                       xclient_addr=client, helo="mail.pass.test", data_file=path)
    assert result.code("DATA_END") == 250, result.transcript
    delivered = lab.sink.wait_for(before + 1)[before].message()
    headers = [re.sub(r"\s+", " ", str(v)) for v in delivered.get_all(
        "Authentication-Results") or []]

    def side(authserv_id: str) -> Side:
        found = [h for h in headers if h.lower().startswith(authserv_id + ";")
                 and "dmarc=" in h]
        if not found:
            return Side(NO_VERDICT, "; ".join(headers))
        assert len(found) == 1, f"{authserv_id}: {headers}"
        # Read as the later milters read it: with several From domains, the strictest.
        read = auth_results.verdicts([("Authentication-Results", found[0])], authserv_id)
        assert read is not None and "dmarc" in read, f"{authserv_id}: unreadable {found[0]}"
        return Side(read["dmarc"], found[0])
    return side(AUTHSERV_ID), side(PEER_ID)


def _replay(lab: Lab) -> bytes:
    return sign_rsa(message("ceo@pass.test", subject="replayed"), "attacker.test", lab.keys)


def _length_trick(lab: Lab) -> bytes:
    raw = message("ceo@pass.test", subject="l= trick")
    header = dkim.sign(raw, b"rsa", b"pass.test", lab.keys.rsa_private.read_bytes(),
                       length=True, include_headers=[b"from", b"subject"])
    return header + raw + b"\r\nAppended by someone else: http://phish.example/\r\n"


# (case, message, client, MAIL FROM, ours, OpenDMARC's, the RFC text deciding a difference)
Case = tuple[str, Callable[[Lab], bytes], str, str, str, str, str]
CASES: list[Case] = [
    ("aligned rsa-sha256 DKIM", lambda lab: sign_rsa(message(subject="dkim"), "pass.test",
                                                    lab.keys),
     STRANGER_IP, "ceo@pass.test", "pass", "pass", ""),
    ("aligned SPF", lambda lab: message(subject="spf"), GOOD_IP, "ceo@pass.test",
     "pass", "pass", ""),
    ("nothing aligned, p=reject", lambda lab: message(subject="fail"), STRANGER_IP,
     "ceo@pass.test", "fail", "fail", ""),
    ("nothing aligned, p=none", lambda lab: message("n@none.test", subject="none"),
     STRANGER_IP, "n@none.test", "fail", "fail", ""),
    ("signature replayed from another domain", _replay, STRANGER_IP, "b@attacker.test",
     "fail", "fail", ""),
    ("SPF softfail only", lambda lab: message("s@soft.test", subject="soft"), STRANGER_IP,
     "s@soft.test", "fail", "fail", ""),
    ("subdomain under sp=reject", lambda lab: message("x@sub.org.test", subject="sp"),
     STRANGER_IP, "x@sub.org.test", "fail", "none",
     "RFC 7489 6.6.3: with no record at the From domain the organisational domain's record "
     "applies, and its sp= is the policy for subdomains (6.3); nothing is aligned, so the "
     "result is fail with p=reject. OpenDMARC 1.4.2 finds the record but reports "
     "dmarc=none (p=none), ignoring sp="),
    ("no DMARC record", lambda lab: message("x@nodmarc.test", subject="no record"),
     STRANGER_IP, "x@nodmarc.test", "none", "none", ""),
    ("strict SPF alignment, subdomain MAIL FROM",
     lambda lab: message("x@strict.test", subject="aspf=s"), GOOD_IP, "x@mail.strict.test",
     "fail", "fail", ""),
    ("rsa-sha1 signature (OpenDKIM's signer)",
     lambda lab: sign_opendkim(message(subject="sha1"), "pass.test", lab.keys, lab.workdir),
     STRANGER_IP, "ceo@pass.test", "fail", "pass",
     "RFC 8301 3.1: verifiers MUST NOT consider rsa-sha1 signatures valid; OpenDKIM 2.11 "
     "still passes them, so OpenDMARC sees an aligned pass"),
    ("l= with appended content", _length_trick, STRANGER_IP, "ceo@pass.test", "fail", "pass",
     "RFC 6376 8.2: content past l= is unsigned and may be anything; we do not count such a "
     "signature as a pass (dkim=policy), OpenDKIM does"),
    ("two DMARC records", lambda lab: message("x@tworec.test", subject="two"), STRANGER_IP,
     "x@tworec.test", "permerror", "fail",
     "RFC 7489 6.6.3 step 5: with more than one DMARC record policy discovery ends and no "
     "DMARC policy applies (we report permerror, the registry's result for a broken record, "
     "11.2); OpenDMARC picks one record (p=none) and evaluates"),
    ("broken SPF record, no DKIM", lambda lab: message("x@spfbroken.test", subject="spfperm"),
     STRANGER_IP, "x@spfbroken.test", "fail", "fail", ""),
    ("no From header", lambda lab: message(None, subject="nofrom"), STRANGER_IP,
     "ceo@pass.test", "permerror", NO_VERDICT,
     "RFC 7489 6.6.1: a message without a From field is outside DMARC and local policy "
     "decides; RFC 5322 3.6 requires exactly one From. We say permerror (and tag or reject "
     "per on_bad_from), OpenDMARC writes no DMARC verdict at all"),
    ("two From headers", lambda lab: message("b@nodmarc.test\r\nFrom: a@pass.test",
                                             subject="twofrom"), STRANGER_IP,
     "ceo@pass.test", "fail", "none",
     "RFC 7489 6.6.1: with several From fields we evaluate each author domain and apply the "
     "strictest result (pass.test, p=reject, fails here); OpenDMARC evaluates the first From "
     "only (nodmarc.test, no record), so a forged From of a p=reject domain under another one "
     "reaches the reader unchecked"),
    ("From domain whose server refuses (DNS failure)",
     lambda lab: message("x@elsewhere.example", subject="refused"), STRANGER_IP,
     "x@elsewhere.example", "temperror", "none",
     "RFC 7489 11.2: temperror when a later attempt might give a final result (the DNS "
     "server failed, REFUSED); OpenDMARC reports none, as if no record were published, so a "
     "p=reject domain's forgeries pass whenever its DNS is unreachable"),
    ("p=bogus without rua", lambda lab: message("x@broken.test", subject="bogus"),
     STRANGER_IP, "x@broken.test", "permerror", "permerror", ""),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_message_same_dmarc_verdict_or_a_pinned_difference(lab: Lab, case: Case) -> None:
    name, build, client, mail_from, ours_expected, theirs_expected, why = case
    ours, theirs = verdicts(lab, build(lab), client, mail_from)
    assert (ours.dmarc, theirs.dmarc) == (ours_expected, theirs_expected), \
        f"{name}: ours {ours.header!r}; OpenDMARC {theirs.header!r}; {why}"
    if ours_expected == theirs_expected:
        # Agreement covers the domain too.
        domain = re.search(r"header\.from=([\w.]+)", theirs.header)
        assert domain and f"header.from={domain.group(1)}" in ours.header
