"""A small Internet for the auth milter tests: keys, signed messages and the DNS zones that
publish SPF, DKIM (RSA and ed25519) and DMARC records, served by a real Knot DNS on loopback.

Signatures come from signers outside this project, as a real sender's would: dkimpy's
(rsa-sha256, ed25519-sha256) and Debian's OpenDKIM library through opendkim-testmsg (which
signs rsa-sha1 only: the RFC 8301 case).
"""
from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim
import nacl.encoding
import nacl.signing

# Clients as Postfix presents them through XCLIENT (documentation addresses).
GOOD_IP = "192.0.2.10"  # in the SPF records of the *.test senders
STRANGER_IP = "198.51.100.20"  # in no SPF record but attacker.test's
AUTHSERV_ID = "mx.test"


def _split_txt(text: str) -> str:
    """A long TXT value as several quoted strings of at most 255 bytes (RFC 1035 3.3.14)."""
    parts = [text[i:i + 250] for i in range(0, len(text), 250)]
    return "( " + " ".join(f'"{p}"' for p in parts) + " )"


@dataclass
class Keys:
    rsa_private: Path
    rsa_public_b64: str
    ed_private_b64: bytes  # dkimpy wants the base64 seed
    ed_public_b64: str


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / "rsa.private"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True,
                   capture_output=True)
    public = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout"], check=True,
                            capture_output=True).stdout.decode()
    public_b64 = "".join(line for line in public.splitlines() if not line.startswith("-----"))
    seed = nacl.signing.SigningKey.generate()
    return Keys(private, public_b64, base64.b64encode(bytes(seed)),
                seed.verify_key.encode(nacl.encoding.Base64Encoder).decode())


def zones(keys: Keys) -> dict[str, list[str]]:
    rsa_key = _split_txt(f"v=DKIM1; k=rsa; p={keys.rsa_public_b64}")
    ed_key = f'"v=DKIM1; k=ed25519; p={keys.ed_public_b64}"'
    spf = '"v=spf1 ip4:192.0.2.0/24 -all"'
    return {
        "pass.test": [f"@ 300 IN TXT {spf}", f"rsa._domainkey 300 IN TXT {rsa_key}",
                      f"ed._domainkey 300 IN TXT {ed_key}",
                      '_dmarc 300 IN TXT "v=DMARC1; p=reject; rua=mailto:d@pass.test"'],
        "quar.test": [f"@ 300 IN TXT {spf}", '_dmarc 300 IN TXT "v=DMARC1; p=quarantine"'],
        "none.test": [f"@ 300 IN TXT {spf}", '_dmarc 300 IN TXT "v=DMARC1; p=none"'],
        "attacker.test": ['@ 300 IN TXT "v=spf1 ip4:198.51.100.0/24 -all"',
                          f"rsa._domainkey 300 IN TXT {rsa_key}",
                          '_dmarc 300 IN TXT "v=DMARC1; p=none"'],
        "broken.test": [f"@ 300 IN TXT {spf}", '_dmarc 300 IN TXT "v=DMARC1; p=bogus"'],
        "nodmarc.test": [f"@ 300 IN TXT {spf}"],
        # 例え.test, as DNS holds it (IDNA2008 A-label)
        "xn--r8jz45g.test": [f"@ 300 IN TXT {spf}",
                             '_dmarc 300 IN TXT "v=DMARC1; p=reject"'],
    }


def message(from_header: str | None = "ceo@pass.test", subject: str = "Quarterly report",
            body: str = "Please find the figures below.\r\n", extra: str = "") -> bytes:
    head = f"From: {from_header}\r\n" if from_header is not None else ""
    return (f"{head}To: taro@example.jp\r\nSubject: {subject}\r\n"
            f"Message-ID: <{abs(hash((from_header, subject, body)))}@pass.test>\r\n"
            f"Date: Sun, 29 Nov 2026 10:00:00 +0900\r\n{extra}\r\n{body}").encode()


def sign_opendkim(raw: bytes, domain: str, keys: Keys, workdir: Path) -> bytes:
    """Signed by Debian's opendkim-testmsg (the OpenDKIM library). It signs with its
    library default, rsa-sha1, which RFC 8301 forbids verifiers to accept."""
    done = subprocess.run(["opendkim-testmsg", "-C", "-d", domain, "-s", "rsa",
                           "-k", str(keys.rsa_private), "-t", str(workdir)],
                          input=raw, capture_output=True, check=True)
    signed = done.stdout.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert signed.lower().startswith(b"dkim-signature:"), done.stderr
    return signed


def sign_rsa(raw: bytes, domain: str, keys: Keys, workdir: Path | None = None) -> bytes:
    """rsa-sha256 by dkimpy's signer, relaxed/simple as most senders use."""
    header = dkim.sign(raw, b"rsa", domain.encode(), keys.rsa_private.read_bytes(),
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return header + raw


def sign_ed25519(raw: bytes, domain: str, keys: Keys) -> bytes:
    header = dkim.sign(raw, b"ed", domain.encode(), keys.ed_private_b64,
                       signature_algorithm=b"ed25519-sha256",
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return header + raw
