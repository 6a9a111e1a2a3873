"""`mailmoat dkim keygen` (a key file, mode 0600, and the TXT record to publish) and
`mailmoat dkim check` (the published record against the key on disk, through the
configured resolver: match, mismatch, missing or revoked; exit 0 only on match)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from milters.core.config import load_config
from milters.core.dns import DnsTempError, Resolver
from milters.core.errors import MailmoatError
from milters.core.dkim_keys import (KeyFileError, check_domain, check_selector, load_private_key,
                               public_record, record_strings)


def _names(args: argparse.Namespace) -> tuple[str, str]:
    try:
        return check_domain(args.domain), check_selector(args.selector)
    except ValueError as exc:
        raise MailmoatError(str(exc)) from None


def cmd_keygen(args: argparse.Namespace) -> int:
    domain, selector = _names(args)
    if args.type == "ed25519":
        if args.bits is not None:
            raise MailmoatError("--bits is for RSA keys; an ed25519 key has no size to choose")
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
            ed25519.Ed25519PrivateKey.generate())
        what = "ed25519"
    else:
        bits = 2048 if args.bits is None else args.bits
        if not 1024 <= bits <= 8192:
            raise MailmoatError(f"--bits {bits}: choose 1024 to 8192 (2048 recommended; "
                                "verifiers refuse less than 1024, RFC 8301)")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        what = f"rsa {bits}"
    # RSA as PKCS#1 ("BEGIN RSA PRIVATE KEY", what opendkim-genkey writes and dkimpy
    # reads); ed25519 has only PKCS#8.
    form = (serialization.PrivateFormat.TraditionalOpenSSL if isinstance(key, rsa.RSAPrivateKey)
            else serialization.PrivateFormat.PKCS8)
    pem = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    out = Path(args.out or f"{domain}.{selector}.key")
    try:  # O_EXCL: never overwrite a key (a published selector would stop verifying)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise MailmoatError(f"{out} exists; not overwritten (choose another --out or "
                            "selector)") from None
    except OSError as exc:
        raise MailmoatError(f"cannot write {out}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(pem)
    print(f"wrote {out} ({what}, mode 0600)")
    print("publish this TXT record:")
    strings = " ".join(f'"{s}"' for s in record_strings(public_record(key)))
    print(f"{selector}._domainkey.{domain}. IN TXT ( {strings} )")
    return 0


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for item in record.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            tags.setdefault(name.strip(), "".join(value.split()))  # FWS inside p= is allowed
    return tags


def cmd_check(args: argparse.Namespace) -> int:
    domain, selector = _names(args)
    path = Path(args.key or f"{domain}.{selector}.key")
    try:
        _, key = load_private_key(path)
    except KeyFileError as exc:
        raise MailmoatError(str(exc)) from None
    config = load_config(args.config)
    name = f"{selector}._domainkey.{domain}"
    try:
        records = Resolver(config.dns).txt(name)
    except DnsTempError as exc:
        raise MailmoatError(f"{name}: {exc}; try again") from None
    found = [_tags(r.decode("utf-8", "replace")) for r in records]
    found = [tags for tags in found if "p" in tags]
    want = _tags(public_record(key))
    if not found:
        print(f"{name}: missing (no DKIM key record); publish the one keygen printed")
        return 1
    if len(found) > 1:
        print(f"{name}: mismatch ({len(found)} key records; verifiers need exactly one)")
        return 1
    tags = found[0]
    if tags["p"] == "":
        print(f"{name}: revoked (p= is empty)")
        return 1
    if tags.get("k", "rsa") != want["k"] or tags["p"] != want["p"]:
        print(f"{name}: mismatch (the published k={tags.get('k', 'rsa')} key is not the "
              f"public half of {path})")
        return 1
    print(f"{name}: match ({path})")
    return 0


def add_parser(sub: argparse._SubParsersAction, parser_class: type, config_help: str) -> None:
    dkim = sub.add_parser("dkim", help="DKIM signing keys: make one, check its DNS record")
    dsub = dkim.add_subparsers(dest="dkim_command", required=True, parser_class=parser_class)
    keygen = dsub.add_parser("keygen", help="write a new key (0600) and print its TXT record")
    check = dsub.add_parser("check", help="compare the published record with the key file")
    for command in (keygen, check):
        command.add_argument("--domain", required=True, metavar="D")
        command.add_argument("--selector", required=True, metavar="S")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, metavar="N", help="RSA size (default 2048)")
    keygen.add_argument("--out", metavar="FILE", help="default: D.S.key here")
    keygen.set_defaults(func=cmd_keygen)
    check.add_argument("--key", metavar="FILE", help="default: D.S.key here")
    check.add_argument("--config", metavar="FILE", help=config_help)
    check.set_defaults(func=cmd_check)
