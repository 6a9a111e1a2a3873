"""DKIM (RFC 6376, RFC 8301, RFC 8463) and ARC (RFC 8617) verification on real signatures.

RSA signatures come from OpenDKIM (Debian's opendkim-genkey for keys, the opendkim filter's
test mode and opendkim-testmsg for signing), so the verifier is checked against a signer
that is not dkimpy; ed25519, l= and ARC signatures come from dkimpy, the only signer at hand
for them. Keys are "published" in a dict that answers the verifier's TXT lookups.
"""
from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path
from typing import Callable

import dkim
import nacl.signing
import pytest

from milters.auth.dkim_check import (DkimResult, DkimSettings, verify_arc, verify_dkim)
from milters.core.dns import DnsTempError

DOMAIN = "example.org"
SELECTOR = "mail2026"
KEY_NAME = f"{SELECTOR}._domainkey.{DOMAIN}"

MESSAGE = (b"Received: from client.example.org (client.example.org [192.0.2.10])\r\n"
           b"\tby mx.example.org; Sun, 29 Nov 2026 01:00:00 +0000\r\n"
           b"From: Alice <alice@example.org>\r\n"
           b"To: Bob <bob@example.net>\r\n"
           b"Subject: Quarterly invoice\r\n"
           b"Date: Sun, 29 Nov 2026 01:00:00 +0000\r\n"
           b"Message-ID: <invoice-1@example.org>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"Please pay invoice 1234 to account 111-222.\r\n"
           b"Thanks,\r\n"
           b"Alice\r\n")

Zone = dict[str, "list[bytes] | Exception"]


def lookup_from(zone: Zone) -> Callable[[str], list[bytes]]:
    table = {name.lower().rstrip("."): value for name, value in zone.items()}

    def lookup(name: str) -> list[bytes]:
        value = table.get(name.lower().rstrip("."), [])
        if isinstance(value, Exception):
            raise value
        return list(value)
    return lookup


# --- OpenDKIM as the outside signer ------------------------------------------------------


class OpenDkimKey:
    """A key pair from opendkim-genkey: the private key file and the TXT record to publish."""

    def __init__(self, directory: Path, selector: str, bits: int = 2048) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["opendkim-genkey", "-b", str(bits), "-d", DOMAIN, "-s", selector,
                        "-D", str(directory)], check=True, capture_output=True, timeout=60)
        self.private = directory / f"{selector}.private"
        zone_line = (directory / f"{selector}.txt").read_text()
        # The zone file splits the record into quoted character-strings; DNS joins them.
        self.record = "".join(re.findall(r'"([^"]*)"', zone_line)).encode()
        self.directory = directory
        self.selector = selector

    def sign(self, message: bytes, domain: str = DOMAIN, canon: str = "relaxed/simple",
             when: int | None = None, ttl: int | None = None) -> bytes:
        """The message with a DKIM-Signature prepended by the opendkim filter's test mode
        (rsa-sha256; `when`/`ttl` give t= and x=)."""
        config = self.directory / "opendkim.conf"
        # tmp_path lies below the world-writable /tmp, which opendkim refuses for keys.
        lines = ["RequireSafeKeys false"] + ([f"SignatureTTL {ttl}"] if ttl else [])
        config.write_text("\n".join(lines) + "\n")
        command = ["opendkim", "-x", str(config), "-b", "s", "-d", domain, "-s", self.selector,
                   "-k", str(self.private), "-S", "rsa-sha256", "-c", canon, "-t", "-"]
        if when is not None:
            command[1:1] = ["-F", str(when)]
        done = subprocess.run(command, input=message, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        # stdout: "opendkim: (stdin):" then the header field, CRLF-terminated lines.
        _, _, header = done.stdout.partition(b"\n")
        assert header.startswith(b"DKIM-Signature:"), done.stdout
        return header.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + message

    def sign_testmsg(self, message: bytes) -> bytes:
        """The whole message as opendkim-testmsg signs it (-C: CRLF line ends)."""
        done = subprocess.run(["opendkim-testmsg", "-C", "-d", DOMAIN, "-s", self.selector,
                               "-k", str(self.private)], input=message, capture_output=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> OpenDkimKey:
    return OpenDkimKey(tmp_path_factory.mktemp("opendkim"), SELECTOR)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> OpenDkimKey:
    return OpenDkimKey(tmp_path_factory.mktemp("opendkim-other"), "other")


@pytest.fixture(scope="module")
def signed(rsa_key: OpenDkimKey) -> bytes:
    return rsa_key.sign(MESSAGE)


def published(key: OpenDkimKey, name: str = KEY_NAME) -> Zone:
    return {name: [key.record]}


def only(results: list[DkimResult]) -> DkimResult:
    assert len(results) == 1, results
    return results[0]


def b_tag(message: bytes) -> str:
    headers, _ = dkim.rfc822_parse(message)
    value = next(v for n, v in headers if n.lower() == b"dkim-signature")
    return re.sub(rb"\s+", b"", dkim.util.parse_tag_value(value)[b"b"]).decode()


# --- RSA, signed by OpenDKIM -----------------------------------------------------------------


def test_opendkim_key_record_is_rsa_sha256(rsa_key: OpenDkimKey) -> None:
    """RFC 6376 3.6.1: what opendkim-genkey publishes (Debian: 2048 bits, h=sha256)."""
    assert rsa_key.record.startswith(b"v=DKIM1;") and b"k=rsa" in rsa_key.record
    assert b"h=sha256" in rsa_key.record


def test_untouched_message_passes(signed: bytes, rsa_key: OpenDkimKey) -> None:
    """RFC 6376 6.1: a valid rsa-sha256 signature verifies; the result names d=, s= and the
    first characters of b= (RFC 6008) so the admin can tell signatures apart."""
    result = only(verify_dkim(signed, lookup_from(published(rsa_key))))
    assert result.result == "pass", result.reason
    assert (result.domain, result.selector, result.algorithm) == (DOMAIN, SELECTOR,
                                                                  "rsa-sha256")
    assert result.header_b == b_tag(signed)[:8]


def test_changed_body_fails(signed: bytes, rsa_key: OpenDkimKey) -> None:
    """RFC 6376 6.1.3: a body that no longer matches bh= fails."""
    tampered = signed.replace(b"account 111-222", b"account 999-888")
    result = only(verify_dkim(tampered, lookup_from(published(rsa_key))))
    assert result.result == "fail" and result.domain == DOMAIN


def test_changed_signed_header_fails(signed: bytes, rsa_key: OpenDkimKey) -> None:
    """RFC 6376 6.1.3: a header listed in h= (Subject) that changed breaks b=."""
    signed_list = re.search(rb"[;\s]h=([^;]*)", signed)
    assert signed_list and b"Subject" in signed_list.group(1)
    tampered = signed.replace(b"Subject: Quarterly invoice", b"Subject: Urgent invoice")
    result = only(verify_dkim(tampered, lookup_from(published(rsa_key))))
    assert result.result == "fail"


def test_added_unsigned_header_still_passes(signed: bytes, rsa_key: OpenDkimKey) -> None:
    """RFC 6376 5.4: headers not in h= (a relay's Received, a list's X- header) may be
    added in transit without breaking the signature."""
    relayed = (b"Received: from mx.example.org by mx2.example.net; Sun, 29 Nov 2026\r\n"
               b"X-Mailing-List: staff@example.net\r\n" + signed)
    result = only(verify_dkim(relayed, lookup_from(published(rsa_key))))
    assert result.result == "pass", result.reason


def test_missing_key_is_permerror(signed: bytes) -> None:
    """RFC 6376 6.1.2 (NXDOMAIN for the key: PERMFAIL, no key for signature)."""
    result = only(verify_dkim(signed, lookup_from({})))
    assert result.result == "permerror" and result.domain == DOMAIN


def test_revoked_key_is_permerror(signed: bytes) -> None:
    """RFC 6376 3.6.1: an empty p= means the key was revoked: PERMFAIL."""
    zone: Zone = {KEY_NAME: [b"v=DKIM1; k=rsa; p="]}
    result = only(verify_dkim(signed, lookup_from(zone)))
    assert result.result == "permerror"


def test_key_dns_temp_error_is_temperror(signed: bytes) -> None:
    """RFC 6376 6.1.2 (key query failed to respond: TEMPFAIL) / RFC 8601 2.7.1 temperror."""
    zone: Zone = {KEY_NAME: DnsTempError("SERVFAIL for key")}
    result = only(verify_dkim(signed, lookup_from(zone)))
    assert result.result == "temperror"


def test_rsa_sha1_against_sha256_only_key_does_not_pass(rsa_key: OpenDkimKey) -> None:
    """RFC 6376 6.1.2 step 6: when the key record's h= does not list the signature's hash
    (opendkim-testmsg signs rsa-sha1; the key says h=sha256) the verifier MUST ignore the
    signature (PERMFAIL, inappropriate hash algorithm); RFC 8301 3.1 forbids verifying
    rsa-sha1 at all."""
    message = rsa_key.sign_testmsg(MESSAGE)
    assert b"a=rsa-sha1" in message
    result = only(verify_dkim(message, lookup_from(published(rsa_key))))
    assert result.result in ("fail", "permerror", "policy"), result


def test_rsa_sha1_is_not_a_pass(rsa_key: OpenDkimKey) -> None:
    """RFC 8301 3.1: rsa-sha1 MUST NOT be used for verifying; such a signature has
    permanently failed evaluation, even when the key record does not restrict h=."""
    message = rsa_key.sign_testmsg(MESSAGE)
    unrestricted = re.sub(rb"h=sha256;\s*", b"", rsa_key.record)
    assert b"h=" not in unrestricted
    result = only(verify_dkim(message, lookup_from({KEY_NAME: [unrestricted]})))
    assert result.result in ("fail", "permerror", "policy"), result


def test_allow_sha1_still_honours_key_hash_restriction(rsa_key: OpenDkimKey) -> None:
    """RFC 6376 3.6.1 h= and 6.1.2 step 6: a policy that tolerates legacy rsa-sha1 signers
    (allow_sha1) may pass them only where the key record allows sha1; a key published with
    h=sha256 says its owner never signs with sha1, so such a signature is a forgery or a
    mistake, never a pass."""
    message = rsa_key.sign_testmsg(MESSAGE)
    legacy = DkimSettings(allow_sha1=True)
    unrestricted = re.sub(rb"h=sha256;\s*", b"", rsa_key.record)
    allowed = only(verify_dkim(message, lookup_from({KEY_NAME: [unrestricted]}), legacy))
    assert allowed.result == "pass", allowed.reason  # the setting does what it says
    restricted = only(verify_dkim(message, lookup_from(published(rsa_key)), legacy))
    assert restricted.result in ("fail", "permerror", "policy"), restricted


def test_512_bit_key_is_policy(tmp_path: Path) -> None:
    """RFC 8301 3.2: keys below 1024 bits MUST NOT be treated as valid; reported as
    'policy' (RFC 8601 2.7.1: signed, but not acceptable to this ADMD)."""
    pem = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True,
                         timeout=60).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem,
                            capture_output=True, check=True, timeout=60).stdout
    message = dkim.sign(MESSAGE, b"weak", DOMAIN.encode(), pem) + MESSAGE
    zone: Zone = {f"weak._domainkey.{DOMAIN}": [b"v=DKIM1; k=rsa; p="
                                               + base64.b64encode(public)]}
    strict = only(verify_dkim(message, lookup_from(zone), DkimSettings(min_rsa_bits=1024)))
    assert strict.result == "policy" and "1024" in strict.reason
    # The same signature is cryptographically sound: a policy allowing 512 bits passes it.
    lenient = only(verify_dkim(message, lookup_from(zone), DkimSettings(min_rsa_bits=512)))
    assert lenient.result == "pass"


# --- ed25519 (RFC 8463) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ed25519() -> tuple[bytes, Zone]:
    """A private key as dkimpy wants it (base64 seed) and its published record."""
    key = nacl.signing.SigningKey.generate()
    record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(key.verify_key))
    return base64.b64encode(bytes(key)), {f"ed._domainkey.{DOMAIN}": [record]}


def test_ed25519_signature_passes(ed25519: tuple[bytes, Zone]) -> None:
    """RFC 8463 3: ed25519-sha256 signatures verify against a k=ed25519 key."""
    private, zone = ed25519
    message = dkim.sign(MESSAGE, b"ed", DOMAIN.encode(), private,
                        signature_algorithm=b"ed25519-sha256") + MESSAGE
    result = only(verify_dkim(message, lookup_from(zone)))
    assert result.result == "pass", result.reason
    assert result.algorithm == "ed25519-sha256" and result.selector == "ed"


def test_ed25519_altered_message_fails(ed25519: tuple[bytes, Zone]) -> None:
    """RFC 8463 3 / RFC 6376 6.1.3: altering a signed header breaks an ed25519 signature."""
    private, zone = ed25519
    message = dkim.sign(MESSAGE, b"ed", DOMAIN.encode(), private,
                        signature_algorithm=b"ed25519-sha256") + MESSAGE
    tampered = message.replace(b"To: Bob <bob@example.net>", b"To: Eve <eve@example.net>")
    assert only(verify_dkim(tampered, lookup_from(zone))).result == "fail"


# --- l= (RFC 6376 8.2) -----------------------------------------------------------------------

MULTIPART = (b"From: Alice <alice@example.org>\r\n"
             b"To: Bob <bob@example.net>\r\n"
             b"Subject: Newsletter\r\n"
             b"MIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
             b"\r\n"
             b"--b1\r\n"
             b"Content-Type: text/plain\r\n"
             b"\r\n"
             b"Our monthly news.\r\n"
             b"--b1--\r\n")


def sign_with_length(message: bytes, ed25519: tuple[bytes, Zone]) -> bytes:
    private, _ = ed25519
    return dkim.sign(message, b"ed", DOMAIN.encode(), private, length=True,
                     signature_algorithm=b"ed25519-sha256") + message


@pytest.mark.parametrize("appended", [
    b"PS: the account number changed, pay to 999-888.\r\n",
    b"--b1\r\nContent-Type: text/html\r\n\r\n<a href=\"http://evil.test/\">Log in</a>\r\n"
    b"--b1--\r\n",
], ids=["a line", "a new MIME part"])
def test_l_tag_with_appended_content_is_policy(ed25519: tuple[bytes, Zone],
                                               appended: bytes) -> None:
    """RFC 6376 8.2: with l= anyone can append content below a valid signature; this
    gateway does not call that a pass unless its policy allows partial bodies."""
    message = sign_with_length(MULTIPART, ed25519) + appended
    assert b"l=" in message.split(b"\r\n\r\n", 1)[0]
    _, zone = ed25519
    default = only(verify_dkim(message, lookup_from(zone)))
    assert default.result == "policy", default
    allowed = only(verify_dkim(message, lookup_from(zone),
                               DkimSettings(allow_partial_body=True)))
    assert allowed.result == "pass", allowed.reason


def test_l_tag_covering_whole_body_passes(ed25519: tuple[bytes, Zone]) -> None:
    """RFC 6376 3.5 l=: when l= covers the whole body nothing is unsigned: a plain pass."""
    message = sign_with_length(MULTIPART, ed25519)
    _, zone = ed25519
    assert only(verify_dkim(message, lookup_from(zone))).result == "pass"


# --- x= expiry (RFC 6376 3.5) ----------------------------------------------------------------


def test_expired_signature_fails_unless_allowed(rsa_key: OpenDkimKey) -> None:
    """RFC 6376 3.5 x=: a signature past its expiration MUST be considered invalid. dkimpy
    1.1.8's sign() has no expiry parameter, so OpenDKIM signs with a fixed past time (-F)
    and SignatureTTL (x= = t= + 3600)."""
    message = rsa_key.sign(MESSAGE, when=1_700_000_000, ttl=3600)
    assert b"x=1700003600" in message
    zone = published(rsa_key)
    expired = only(verify_dkim(message, lookup_from(zone)))
    assert expired.result == "fail" and "expired" in expired.reason
    allowed = only(verify_dkim(message, lookup_from(zone), DkimSettings(allow_expired=True)))
    assert allowed.result == "pass", allowed.reason
    # The switch is per check: the next default check is strict again.
    assert only(verify_dkim(message, lookup_from(zone))).result == "fail"


def test_signature_not_yet_expired_passes(rsa_key: OpenDkimKey) -> None:
    """RFC 6376 3.5 x=: before expiry the signature is valid."""
    message = rsa_key.sign(MESSAGE, ttl=86400)
    assert re.search(rb"x=\d+", message)
    assert only(verify_dkim(message, lookup_from(published(rsa_key)))).result == "pass"


# --- several signatures, garbage -------------------------------------------------------------


def test_two_signatures_give_two_results_in_order(rsa_key: OpenDkimKey,
                                                  other_key: OpenDkimKey) -> None:
    """RFC 6376 6.1 / RFC 8601 2.7.1: each signature is its own result, top to bottom; a
    bad one does not spoil a good one."""
    good = rsa_key.sign(MESSAGE)
    # OpenDKIM only signs for the From domain; a list's own signature comes from dkimpy.
    both = dkim.sign(good, b"other", b"lists.example.com",
                     other_key.private.read_bytes()) + good  # prepended: on top
    # lists.example.com publishes a different key from the one that signed.
    zone = published(rsa_key) | {"other._domainkey.lists.example.com": [rsa_key.record]}
    results = verify_dkim(both, lookup_from(zone))
    assert [(r.domain, r.result) for r in results] == [("lists.example.com", "fail"),
                                                       (DOMAIN, "pass")]


@pytest.mark.parametrize("value", [
    b"this is not a tag list",
    b"v=1; a=rsa-sha256; d=example.org; s=x; h=from; bh=!!!; b=@@@",
    b"v=1; a=rsa-md5; d=example.org; s=x; h=from; bh=AAAA; b=AAAA",
    b"v=1; a=rsa-sha256; d=; s=; h=; bh=; b=",
    b"v=1; v=1; a=rsa-sha256",
    b"=;=;=",
    b"v=1; a=rsa-sha256; c=bogus/bogus; d=example.org; s=x; h=from; bh=AAAA; b=AAAA",
    b"v=1; a=rsa-sha256; d=example.org; s=x; h=from; bh=AAAA; b=AAAA; l=-1",
    b"v=1; a=rsa-sha256; d=example.org; s=x; h=from; bh=AAAA; b=AAAA; i=@evil.test",
    b"v=1; a=rsa-sha256; d=exa(mple.org; s=x; h=from; bh=AAAA; b=AAAA",
], ids=["words", "bad base64", "unknown algorithm", "empty tags", "duplicate tag",
        "empty names", "bad canonicalization", "negative l", "i outside d", "bad d"])
def test_garbage_signature_is_permerror(value: bytes, rsa_key: OpenDkimKey) -> None:
    """RFC 6376 6.1.1: a signature that cannot be parsed or breaks the tag rules is
    PERMFAIL (RFC 8601 permerror), never an exception that would take the session down."""
    message = b"DKIM-Signature: " + value + b"\r\n" + MESSAGE
    # A usable key, so that only the signature itself can be the problem.
    zone: Zone = {"x._domainkey.example.org": [rsa_key.record]}
    result = only(verify_dkim(message, lookup_from(zone)))
    assert result.result == "permerror", result


# --- ARC (RFC 8617) --------------------------------------------------------------------------

SEALER = "fwd.example.com"


@pytest.fixture(scope="module")
def arc_sealed(rsa_key: OpenDkimKey) -> tuple[bytes, Zone]:
    """A message the forwarder fwd.example.com received, checked (its own
    Authentication-Results) and sealed as ARC instance 1."""
    checked = (f"Authentication-Results: {SEALER}; spf=pass smtp.mailfrom=example.org;\r\n"
               f"\tdkim=none; dmarc=pass header.from=example.org\r\n").encode() + MESSAGE
    arc_headers = dkim.arc_sign(checked, b"arc", SEALER.encode(),
                                rsa_key.private.read_bytes(), SEALER.encode())
    assert len(arc_headers) == 3
    return b"".join(arc_headers) + checked, {f"arc._domainkey.{SEALER}": [rsa_key.record]}


def test_arc_sealed_message_passes(arc_sealed: tuple[bytes, Zone]) -> None:
    """RFC 8617 5.2: a valid chain gives cv=pass and names the sealer."""
    message, zone = arc_sealed
    result = verify_arc(message, lookup_from(zone))
    assert result.result == "pass", result.reason
    assert result.sealers == (SEALER,)


def test_arc_tampered_after_sealing_fails(arc_sealed: tuple[bytes, Zone]) -> None:
    """RFC 8617 5.2: a body changed after sealing breaks the ARC-Message-Signature."""
    message, zone = arc_sealed
    tampered = message.replace(b"account 111-222", b"account 999-888")
    assert verify_arc(tampered, lookup_from(zone)).result == "fail"


def test_arc_key_dns_temp_error_is_not_pass(arc_sealed: tuple[bytes, Zone]) -> None:
    """RFC 8617 5.2: a chain that could not be checked is no pass."""
    message, _ = arc_sealed
    zone: Zone = {f"arc._domainkey.{SEALER}": DnsTempError("timeout")}
    assert verify_arc(message, lookup_from(zone)).result in ("temperror", "fail")


def test_no_arc_headers_is_none() -> None:
    """RFC 8617 4.2.1: no ARC sets: cv=none."""
    result = verify_arc(MESSAGE, lookup_from({}))
    assert result.result == "none" and result.sealers == ()


def test_a_header_section_dkimpy_cannot_split_has_no_signatures_to_check() -> None:
    """Text that is no message at all (a README fed to `mailmoat scan`): no verdict from
    DKIM, and no exception for the milter to turn into an internal-error tempfail."""
    assert verify_dkim(b"# Sample messages\n\nNot a header.\n", lambda name: []) == []


# --- reasons a human reads in our Authentication-Results (issue 13) --------------------------
# Each reason names what happened in words, never a Python repr such as b'...'.
NO_REPR = re.compile(r"""\bb['"]""")


def test_revoked_key_reason_says_revoked(signed: bytes) -> None:
    """RFC 6376 3.6.1: an empty p= is a revoked key, and the reason says so."""
    result = only(verify_dkim(signed, lookup_from({KEY_NAME: [b"v=DKIM1; k=rsa; p="]})))
    assert (result.result, result.reason) == ("permerror", "key revoked (empty p=)")


def test_missing_key_reason_names_the_key(signed: bytes) -> None:
    """RFC 6376 6.1.2: no key record; the reason names where the key was looked for."""
    result = only(verify_dkim(signed, lookup_from({})))
    assert result.reason == f"no key published at {KEY_NAME}"


def test_expired_reason_gives_the_expiry_time(rsa_key: OpenDkimKey) -> None:
    """RFC 6376 3.5 x=: the reason says expired and when, in UTC, not dkimpy's b'...'."""
    message = rsa_key.sign(MESSAGE, when=1_700_000_000, ttl=3600)
    result = only(verify_dkim(message, lookup_from(published(rsa_key))))
    assert result.reason == "signature expired at 2023-11-14 23:13 UTC"


def test_rsa_sha1_reason_names_rfc_8301(rsa_key: OpenDkimKey) -> None:
    """RFC 8301 3.1: the reason names the refused algorithm and the RFC."""
    message = rsa_key.sign_testmsg(MESSAGE)
    unrestricted = re.sub(rb"h=sha256;\s*", b"", rsa_key.record)
    result = only(verify_dkim(message, lookup_from({KEY_NAME: [unrestricted]})))
    assert (result.result, result.reason) == ("policy", "rsa-sha1 refused (RFC 8301)")


def test_small_key_reason_gives_the_size_and_rfc_8301(tmp_path: Path) -> None:
    """RFC 8301 3.2: a 512-bit key; the reason gives its size and the 1024-bit floor."""
    pem = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True,
                         timeout=60).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem,
                            capture_output=True, check=True, timeout=60).stdout
    message = dkim.sign(MESSAGE, b"weak", DOMAIN.encode(), pem) + MESSAGE
    zone: Zone = {f"weak._domainkey.{DOMAIN}": [b"v=DKIM1; k=rsa; p="
                                               + base64.b64encode(public)]}
    result = only(verify_dkim(message, lookup_from(zone), DkimSettings(min_rsa_bits=1024)))
    assert result.reason == "RSA key of 512 bits refused: RFC 8301 requires at least 1024 bits"

def test_key_below_a_stricter_policy_names_the_policy_minimum() -> None:
    """A 1024-bit key meets RFC 8301 but not a policy asking 2048: the reason says whose
    rule it broke."""
    pem = subprocess.run(["openssl", "genrsa", "1024"], capture_output=True, check=True,
                         timeout=60).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem,
                            capture_output=True, check=True, timeout=60).stdout
    message = dkim.sign(MESSAGE, b"mid", DOMAIN.encode(), pem) + MESSAGE
    zone: Zone = {f"mid._domainkey.{DOMAIN}": [b"v=DKIM1; k=rsa; p="
                                              + base64.b64encode(public)]}
    result = only(verify_dkim(message, lookup_from(zone), DkimSettings(min_rsa_bits=2048)))
    assert (result.result, result.reason) == (
        "policy", "RSA key of 1024 bits refused: below the policy minimum of 2048 bits")


@pytest.mark.parametrize("key", [b"v=DKIM1; k=rsa; p=AAAA", b"v=DKIM1; k=ed25519; p=AAAA",
                                 b"v=DKIM1; k=rsa; p=!!!"])
def test_unusable_key_reason_has_no_python_repr(signed: bytes, key: bytes) -> None:
    """A key dkimpy cannot parse: its messages format bytes as b'...'; ours never do."""
    result = only(verify_dkim(signed, lookup_from({KEY_NAME: [key]})))
    assert result.result == "permerror" and result.reason.startswith("key unusable")
    assert not NO_REPR.search(result.reason), result.reason


@pytest.mark.parametrize("tags", [b"a=rsa-sha512", b"x=abc", b"v=2"])
def test_bad_tag_reason_has_no_python_repr(signed: bytes, tags: bytes) -> None:
    """A signature dkimpy refuses (unknown algorithm, bad x=, wrong version): the reason
    quotes the value as text."""
    name, _, rest = tags.partition(b"=")
    mangled = re.sub(rb"(DKIM-Signature: )", rb"\1" + tags + b"; ", signed, count=1)
    if name == b"a":
        mangled = re.sub(rb"\ba=rsa-sha256;\s*", b"", mangled, count=1)
    result = only(verify_dkim(mangled, lookup_from({})))
    assert result.result == "permerror", result
    assert not NO_REPR.search(result.reason), result.reason
