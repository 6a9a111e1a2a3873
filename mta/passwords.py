"""Password hashes shared by the SMTP AUTH users file and the console's accounts file:
`$scrypt$ln=14,r=8,p=1$SALT$HASH` (salt and hash in unpadded base64).

scrypt is memory-hard (16 MiB and ~50 ms per hash at these parameters): slow enough to hurt
offline guessing on a stolen file, fast enough per login.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

LOG2_N, BLOCK_SIZE, PARALLELISM = 14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
HASH_FORMAT = "$scrypt$ln=N,r=R,p=P$SALT$HASH"
_MAX_MEMORY = 256 * 1024 * 1024  # refuse parameters that would let one login eat the RAM


@dataclass(frozen=True)
class PasswordHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes


# Unknown users are checked against this, so a miss costs as much as a wrong password.
DUMMY = PasswordHash(LOG2_N, BLOCK_SIZE, PARALLELISM, secrets.token_bytes(SALT_BYTES),
                     secrets.token_bytes(KEY_BYTES))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def derive(password: str, params: PasswordHash) -> bytes:
    # surrogatepass: a lone surrogate still hashes (to bytes no real password encodes to).
    secret = password.encode("utf-8", "surrogatepass")
    n = 1 << params.log2_n
    return hashlib.scrypt(secret, salt=params.salt, n=n, r=params.r, p=params.p,
                          dklen=len(params.key),
                          maxmem=128 * params.r * (n + params.p + 2) + 1024 * 1024)


def hash_password(password: str) -> str:
    """A new `$scrypt$...` string for `password`, with a fresh random salt."""
    params = PasswordHash(LOG2_N, BLOCK_SIZE, PARALLELISM, secrets.token_bytes(SALT_BYTES),
                          b"\0" * KEY_BYTES)
    key = derive(password, params)
    return (f"$scrypt$ln={params.log2_n},r={params.r},p={params.p}"
            f"${_b64(params.salt)}${_b64(key)}")


def parse_hash(text: str) -> PasswordHash:
    """Check one `$scrypt$...` string; ValueError says what is wrong."""
    parts = text.split("$")
    if len(parts) != 5 or parts[0] != "":
        raise ValueError(f"the hash is not {HASH_FORMAT}")
    if parts[1] != "scrypt":
        raise ValueError(f"unsupported hash scheme '{parts[1]}'; expected {HASH_FORMAT}")
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        log2_n, r, p = int(params.pop("ln")), int(params.pop("r")), int(params.pop("p"))
    except (ValueError, KeyError):
        raise ValueError(f"the parameters must read ln=N,r=R,p=P (got {parts[2]})") from None
    if params:
        raise ValueError(f"unknown scrypt parameter(s) {', '.join(params)}")
    if not (1 <= log2_n <= 24 and 1 <= r <= 64 and 1 <= p <= 16):
        raise ValueError("scrypt parameters out of range (ln 1-24, r 1-64, p 1-16)")
    if 128 * r * (1 << log2_n) > _MAX_MEMORY:
        raise ValueError(f"scrypt parameters need more than {_MAX_MEMORY >> 20} MiB per login")
    try:
        salt, key = _unb64(parts[3]), _unb64(parts[4])
    except (binascii.Error, ValueError):
        raise ValueError("the salt or hash is not base64") from None
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("the salt (8 bytes) or hash (16 bytes) is too short")
    return PasswordHash(log2_n, r, p, salt, key)


def verify_password(password: str, stored: PasswordHash | None) -> bool:
    """True when `password` matches `stored`; None (no such user) costs one full scrypt run
    against DUMMY and is False, so a miss takes as long as a wrong password."""
    params = stored if stored is not None else DUMMY
    matches = hmac.compare_digest(derive(password, params), params.key)
    return matches and stored is not None
