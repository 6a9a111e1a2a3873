"""DKIM private key files: reading them (strict permissions), the public TXT record they
imply, and the names (domain, selector) they are published under. Shared by the sign
milter and `mailmoat dkim keygen|check`.

A key file holds one PEM private key: RSA (PKCS#1 "BEGIN RSA PRIVATE KEY", as
opendkim-genkey writes, or PKCS#8) or ed25519 (PKCS#8). The algorithm comes from the key
itself, so a rotated key of another type cannot be mislabelled in the policy.
"""
from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

PrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers refuse less
MAX_KEY_FILE = 64 * 1024
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
                       r"[a-z0-9])?)*")
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}"
                     r"[a-z0-9])?")


class KeyFileError(ValueError):
    """A key file that cannot be used; the text says which file and the fix."""


def check_domain(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise ValueError(f"not a domain name like example.com (got {text!r})")
    return domain


def check_selector(text: str) -> str:
    selector = text.strip().lower()
    if not _SELECTOR.fullmatch(selector):
        raise ValueError(f"not a DKIM selector (letters, digits, '-' and '.'; got {text!r})")
    return selector


def permission_problem(mode: int) -> str | None:
    """Why a private key with this mode must not be used: only its owner may read it."""
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"is readable or writable by others than its owner (mode "
                f"{stat.S_IMODE(mode):04o}); run 'chmod 600' on it")
    return None


def load_private_key(path: str | Path) -> tuple[str, PrivateKey]:
    """(algorithm, key) from a key file; KeyFileError with the fix when it is unusable."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            # fstat of the open file: the mode checked is the mode of what is read
            problem = permission_problem(os.fstat(handle.fileno()).st_mode)
            if problem:
                raise KeyFileError(f"key file {path} {problem}")
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_FILE} bytes: not a key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, Exception):  # never echo key material in the message
        key = None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"key file {path}: RSA key of {key.key_size} bits; verifiers "
                               f"refuse less than {MIN_RSA_BITS} (RFC 8301), use 2048")
        return "rsa-sha256", key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519-sha256", key
    raise KeyFileError(f"key file {path} holds no unencrypted PEM RSA or ed25519 private key")


def public_record(key: PrivateKey) -> str:
    """The TXT record value to publish at <selector>._domainkey.<domain>."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


def record_strings(value: str, size: int = 255) -> list[str]:
    """A TXT value cut into character-strings of at most `size` bytes (RFC 1035 3.3)."""
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]
