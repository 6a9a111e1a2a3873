"""`mailmoat init DIR [--profile ...]`: a starting gateway.yaml and policy.yaml for one kind
of deployment, valid as written (`policy check` passes, `serve` starts on it), and the next
steps. Like `postconf -n` on a fresh Debian Postfix: a small config that works, each key
commented, the rest left to the defaults.

It never overwrites: an operator's edited config is worth more than a fresh one. Files are
created with O_EXCL, so a file (or a symlink) that appears meanwhile is not written through.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from milters.core.errors import MailmoatError
from milters.core.shipped import shipped_policy

from mta import __version__

GATEWAY_FILE = "gateway.yaml"
POLICY_FILE = "policy.yaml"

# Shared by the profiles that run `serve`: local-only ports a first start can bind as any
# user; state, queue and Maildir beside the config (relative paths are relative to it).
_SERVE_COMMON = """\
  # Where serve listens. A first try on a high port needs no root; in production
  # 0.0.0.0:25, started as root with `user:` below.
  listen: 127.0.0.1:2525
  # user: mailmoat                   # as root: whom serve becomes once its ports are open
  reinject_listen: 127.0.0.1:10026   # where milters hand back copies and notices
  metrics_listen: 127.0.0.1:9781     # Prometheus text format; "" turns it off
  queue: {dir: var/spool}            # the spool; back it up with the state
  run_dir: var/run                   # the milters' unix sockets
"""

_INBOUND = """\
# mailmoat gateway config: inbound gateway, the MX in front of your internal mail server.
# Written by `mailmoat init` (mailmoat {version}, profile inbound-gateway).
# Relative paths are relative to this file's directory.
#
#   mailmoat serve --config {gateway}

gateway:
  hostname: mx.example.jp            # this host's name: the greeting and Received: headers
{common}\
  relay_domains: [example.jp]        # outside clients may send only to these domains
  # valid_recipients: ["@example.jp"]   # who exists in relay_domains; unset = everyone
  relay:
    # Until you point it at your internal server, mail is kept here (Maildir: new/ per
    # recipient), so a first test loses nothing:
    default: "maildir:var/maildir"
    # default: "smtp:[mail.internal.example.jp]:25"
milters:                             # in this order; the first refusal wins
  - {{name: ratelimit}}                # slows down strangers who send too much
  - {{name: auth}}                     # SPF, DKIM, ARC, DMARC (needs DNS)
  - {{name: neutralize}}               # harmless mode for suspicious senders
store: sqlite:///var/state.db        # rate-limit state; redis://HOST:PORT/DB for several gateways
policy: {policy}
"""

_PPAP = """\
# mailmoat gateway config: PPAP countermeasure on the outbound path. Your internal mail
# server relays all outgoing mail through mailmoat; mailmoat zips attachments for outside
# recipients, tells the sender the password, and passes the mail on to your smarthost.
# Written by `mailmoat init` (mailmoat {version}, profile ppap-outbound).
# Relative paths are relative to this file's directory.
#
#   mailmoat serve --config {gateway}

gateway:
  hostname: ppap.example.jp          # this host's name: the greeting and Received: headers
{common}\
  # auth: {{users_file: users}}        # SMTP AUTH users (mailmoat user add NAME --config ...)
  relay:
    # Until you point it at the host that sends your mail out, mail is kept here:
    default: "maildir:var/maildir"
    # default: "smtp:[smarthost.example.jp]:25"
milters:                             # in this order; the first refusal wins
  - {{name: ratelimit}}                # per sender and per SMTP AUTH user
  - {{name: attachments}}              # the ZIP and the password notice
store: sqlite:///var/state.db        # rate-limit state; redis://HOST:PORT/DB for several gateways
policy: {policy}
"""

_POSTFIX = """\
# mailmoat config for milters behind an existing Postfix (no `serve`: Postfix is the MTA).
# Written by `mailmoat init` (mailmoat {version}, profile milters-behind-postfix).
# Relative paths are relative to this file's directory.
#
#   mailmoat milter ratelimit --listen inet:127.0.0.1:8901 --config {gateway}

gateway:
  hostname: mail.example.jp          # the name the milters write in their headers
  # user: mailmoat                   # as root: whom each milter becomes once its socket is open
  reinject_listen: 127.0.0.1:10026   # where milters hand back copies: a Postfix smtpd
                                     # listener without milters (see the next steps)
store: sqlite:///var/state.db        # rate-limit state; redis://HOST:PORT/DB for several hosts
policy: {policy}
"""


@dataclass(frozen=True)
class Profile:
    summary: str
    gateway: str  # the gateway.yaml text, formatted with version, gateway, policy, common
    policy: str   # the shipped policy policy.yaml starts from
    next_steps: str  # formatted with gateway and policy (their paths as written)


PROFILES: dict[str, Profile] = {
    "inbound-gateway": Profile(
        "inbound gateway: SMTP on 127.0.0.1:2525, mail kept in var/maildir",
        _INBOUND, "inbound-gateway.yaml", """\
Next steps:
  1. Edit {gateway}: hostname, relay_domains, then relay.default (your internal server).
  2. Edit {policy}: internal_networks (your servers and offices), the allowlist.
  3. Check it:     mailmoat policy check {policy} && mailmoat policy test {policy}
  4. Start it:     mailmoat serve --config {gateway}
  5. Send a test:  swaks --server 127.0.0.1:2525 --to postmaster@example.jp
     It lands in var/maildir/ beside gateway.yaml (waiting: mailmoat queue list --config ...).
  Then listen on 0.0.0.0:25 as root with `user: mailmoat` and point your MX at this host."""),
    "ppap-outbound": Profile(
        "PPAP outbound: SMTP on 127.0.0.1:2525, mail kept in var/maildir",
        _PPAP, "ppap-outbound.yaml", """\
Next steps:
  1. Edit {gateway}: hostname, then relay.default (the host that sends your mail out).
  2. Edit {policy}: internal_networks (your mail server), recipient: ["!@example.jp"]
     (your own domains), and the partner password file it names (or delete that entry).
  3. Check it:     mailmoat policy check {policy} && mailmoat policy test {policy}
  4. Try a message: mailmoat scan MESSAGE.eml --config {gateway} --client-ip 10.1.0.10
  5. Start it:     mailmoat serve --config {gateway}
  Then have your mail server relay outgoing mail to this host (Postfix: relayhost)."""),
    "milters-behind-postfix": Profile(
        "milters behind Postfix: no SMTP listener of its own",
        _POSTFIX, "postfix-milters.yaml", """\
Next steps:
  1. Edit {policy}: internal_networks, the allowlist.
  2. Check it:     mailmoat policy check {policy} && mailmoat policy test {policy}
  3. Start the milter:
       mailmoat milter ratelimit --listen inet:127.0.0.1:8901 --config {gateway}
  4. In /etc/postfix/main.cf, then `postfix reload`:
       smtpd_milters = inet:127.0.0.1:8901
       milter_default_action = tempfail
       milter_protocol = 6"""),
}
DEFAULT_PROFILE = "inbound-gateway"


def policy_text(profile: Profile, written_as: str) -> str:
    """The shipped policy, its own `mailmoat policy check policies/X.yaml` lines naming the
    file as written (the line count stays: test names carry line numbers)."""
    text = shipped_policy(profile.policy).read_text(encoding="utf-8")
    return text.replace(f"policies/{profile.policy}", written_as)


def _create(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise MailmoatError(f"{path}: already exists; init never overwrites (move it away "
                            "or choose another directory)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def init(directory: Path, profile_name: str) -> list[str]:
    """Write DIR/gateway.yaml and DIR/policy.yaml; the lines to print. Nothing is written
    when either file exists."""
    profile = PROFILES[profile_name]
    gateway, policy = directory / GATEWAY_FILE, directory / POLICY_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MailmoatError(f"{directory}: cannot make the directory: "
                            f"{exc.strerror or exc}") from None
    existing = [str(p) for p in (gateway, policy) if p.exists() or p.is_symlink()]
    if existing:
        raise MailmoatError(f"{', '.join(existing)}: already exists; init never overwrites "
                            "(move it away or choose another directory)")
    try:
        _create(policy, policy_text(profile, str(policy)))
        try:
            _create(gateway, profile.gateway.format(version=__version__, gateway=gateway,
                                                    policy=POLICY_FILE, common=_SERVE_COMMON))
        except BaseException:
            policy.unlink()  # both files or neither
            raise
    except OSError as exc:
        raise MailmoatError(f"{exc.filename or directory}: {exc.strerror or exc}") from None
    return [f"wrote {gateway} ({profile.summary})",
            f"wrote {policy} (from mailmoat's policies/{profile.policy})",
            "", profile.next_steps.format(gateway=gateway, policy=policy)]
