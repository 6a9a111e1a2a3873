"""The `attachments:` section of a policy, its rule action and its test expectations.

Which recipients get which treatment is decided by the policy's rules, once per recipient
(`then: {attachments: encrypt}` with `when: {recipient: ["@partner.example",
"!@ours.example"]}`: exact address, then @domain, then parent domains, `!` winning at the
same level, as in SaMMA). This section says how each treatment is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from milters.core.policy.matching import AddressPattern, NetworkPattern
from milters.core.secrets import SecretSource
from milters.core.policy.schema import (Address, Bool, Duration, Field, ListOf, Network, Number,
                                        Str, Struct)

from .nextcloud import NextcloudSettings, check_folder_template
from .password import DEFAULT_ALPHABET, generate_password

MILTER = "attachments"
MODES = ("encrypt", "offload", "delete", "pass")
ENCRYPTIONS = ("zipcrypto", "aes256")
CHARSETS = ("cp932", "utf-8")
NOTICE_TO = ("sender", "recipients", "both")
ON_UNPARSABLE = ("encrypt_whole", "tempfail")
LANGUAGES = ("ja", "en")


@dataclass(frozen=True)
class FixedPassword:
    """A password agreed with a partner instead of a random one (date patterns allowed).
    The pattern is a secret: it is read from `source` (an environment variable or a file)
    when a ZIP needs it, never written in the policy."""

    recipients: tuple[AddressPattern, ...]
    source: SecretSource  # holds a pattern such as "Partner%Y%m"


@dataclass(frozen=True)
class PasswordSettings:
    length: int = 12
    alphabet: str = ""  # "" = letters and digits
    exclude_ambiguous: bool = True  # no l, 1, O, 0 ... (read over the phone, typed by hand)
    fixed: tuple[FixedPassword, ...] = ()


@dataclass(frozen=True)
class EncryptSettings:
    encryption: str = "zipcrypto"  # Windows Explorer opens ZipCrypto, not AES
    names: str = "cp932"  # what Japanese Windows shows right; "utf-8" sets the UTF-8 flag
    zip_name: str = "AttachFile.%Y%m%d.zip"
    alias: str = "attachment{n}{ext}"  # for a name the charset cannot hold
    password: PasswordSettings = field(default_factory=PasswordSettings)


@dataclass(frozen=True)
class NoticeSettings:
    to: str = "sender"  # who gets the password: sender | recipients | both
    language: str = "ja"
    templates: str = ""  # a directory whose files override the shipped templates
    sender: str = ""  # From: of notices; "" = postmaster@<gateway hostname>
    log_password: bool = False  # the password never reaches the logs unless this is on


@dataclass(frozen=True)
class OffloadSettings:
    """Nextcloud offload. The app password comes from password_env or password_file, never
    from the YAML."""

    nextcloud: NextcloudSettings | None = None  # None: a rule choosing offload is an error
    on_failure: str = "tempfail"  # Nextcloud down or refusing: tempfail | encrypt


@dataclass(frozen=True)
class AttachmentsSettings:
    only_internal_senders: bool = True  # mail from outside is never transformed
    pass_clients: tuple[NetworkPattern, ...] = ()  # clients whose mail passes untouched
    subject_keyword: str = ""  # e.g. "[secure]": forces encrypt, removed from the subject
    inline_images: bool = False  # inline images (cid:) count as attachments
    encrypt: EncryptSettings = field(default_factory=EncryptSettings)
    notice: NoticeSettings = field(default_factory=NoticeSettings)
    offload: OffloadSettings = field(default_factory=OffloadSettings)
    # Attachments decoding to more than this: tempfail (451 4.3.4), checked before any ZIP
    # or upload starts, so one message cannot hold a worker for gigabytes.
    max_total_size: int = 50 * 1024 * 1024
    reinject_timeout: float = 30.0
    # A message whose MIME structure cannot be trusted (certainty.py): the whole message,
    # as original.eml, is the one attachment (ZIP, offload or delete per the rule), or
    # tempfail (451 4.3.0). Never passed with its parts guessed.
    on_unparsable: str = "encrypt_whole"


def _fixed(recipients: list[AddressPattern], password_env: str,
           password_file: str) -> FixedPassword:
    if bool(password_env) == bool(password_file):
        raise ValueError("name where the agreed password is: password_env (an environment "
                         "variable) or password_file, exactly one; never the password itself")
    return FixedPassword(tuple(recipients), SecretSource(password_env, password_file))


def _password_settings(fixed: list[FixedPassword], **kw: object) -> PasswordSettings:
    settings = PasswordSettings(fixed=tuple(fixed), **kw)  # type: ignore[arg-type]
    try:  # refused here, at its line, rather than when the first ZIP is made
        generate_password(settings.length, settings.alphabet or DEFAULT_ALPHABET,
                          exclude_ambiguous=settings.exclude_ambiguous)
    except ValueError as exc:
        raise ValueError(f"no password can be made: {exc}") from None
    return settings


PASSWORD_SPEC = Struct({
    "length": Field(Number(6, 128, integer=True), 12, doc="Characters in a random password."),
    "alphabet": Field(Str(max_len=200), "",
                      doc="Characters a random password is made of; \"\" = letters and digits."),
    "exclude_ambiguous": Field(Bool(), True,
                               doc="Leave out characters people misread (l 1 I O 0 ...)."),
    "fixed": Field(ListOf(Struct({
        "recipients": Field(ListOf(Address(), min_items=1),
                            doc="Recipients this password is for (address patterns)."),
        "password_env": Field(Str(max_len=200), "",
                              doc="Environment variable holding the password pattern (date "
                                  "patterns like %Y%m allowed)."),
        "password_file": Field(Str(max_len=1000), "",
                               doc="File holding the password pattern; must not be readable by "
                                   "others."),
    }, build=_fixed, expected="a fixed password: recipients, and password_env or "
                              "password_file")), (),
                   doc="Passwords agreed with partners, per recipient pattern, instead of a "
                       "random one."),
}, build=lambda fixed, **kw: _password_settings(fixed, **kw),
    expected="password settings: length, alphabet, exclude_ambiguous, fixed")

ENCRYPT_SPEC = Struct({
    "encryption": Field(Str(ENCRYPTIONS), "zipcrypto",
                        doc="zipcrypto (Windows Explorer opens it) or aes256 (7-Zip, macOS; not "
                            "Explorer)."),
    "names": Field(Str(CHARSETS), "cp932",
                   doc="Entry-name encoding in the ZIP: cp932 (what Japanese Windows shows right)"
                       " or utf-8."),
    "zip_name": Field(Str(max_len=200), "AttachFile.%Y%m%d.zip",
                      doc="The ZIP's file name; strftime patterns allowed."),
    "alias": Field(Str(max_len=200), "attachment{n}{ext}",
                   doc="Entry name for a file name cp932 cannot hold; {n} is its number, {ext} "
                       "its extension."),
    "password": Field(PASSWORD_SPEC, factory=PasswordSettings, doc="How passwords are made."),
}, build=EncryptSettings, expected="encrypt settings")

NOTICE_SPEC = Struct({
    "to": Field(Str(NOTICE_TO), "sender",
                doc="Who gets the password notice: sender, recipients or both."),
    "language": Field(Str(LANGUAGES), "ja",
                      doc="Notice language: ja (ISO-2022-JP) or en (UTF-8)."),
    "templates": Field(Str(), "",
                       doc="A directory whose password.ja.txt etc. replace the shipped templates;"
                           " \"\" = shipped ones."),
    "sender": Field(Str(max_len=320), "",
                    doc="From: of notices; \"\" = postmaster@<gateway hostname>."),
    "log_password": Field(Bool(), False,
                          doc="Write passwords to the log; never do this in production."),
}, build=NoticeSettings, expected="notice settings")

def _nextcloud(folder: str, **kw: object) -> NextcloudSettings:
    problem = check_folder_template(folder)
    if problem:
        raise ValueError(problem)
    if not kw.get("password_env") and not kw.get("password_file"):
        raise ValueError("name where the app password is: password_env (an environment "
                         "variable) or password_file; never the password itself")
    return NextcloudSettings(folder=folder, **kw)  # type: ignore[arg-type]


NEXTCLOUD_SPEC = Struct({
    "url": Field(Str(max_len=500), doc="Nextcloud base URL (https://...)."),
    "user": Field(Str(max_len=200), doc="Nextcloud user the files are uploaded as."),
    "password_env": Field(Str(max_len=200), "",
                          doc="Environment variable holding the Nextcloud app password."),
    "password_file": Field(Str(max_len=1000), "",
                           doc="File holding the Nextcloud app password; must not be readable by "
                               "others."),
    "ca_file": Field(Str(max_len=1000), "",
                     doc="CA certificates to trust for Nextcloud; \"\" = the system's."),
    "timeout": Field(Duration(minimum=1), 30.0, doc="Time for one Nextcloud request."),
    "retries": Field(Number(0, 10, integer=True), 2,
                     doc="Retries of a failed Nextcloud request before on_failure applies."),
    "folder": Field(Str(max_len=500), "mailmoat/{sender}/{date}-{id}",
                    doc="Upload folder; {sender}, {date} and {id} are filled in."),
    "expire_days": Field(Number(1, 365, integer=True), 7,
                         doc="Days until the share link expires."),
}, build=_nextcloud, expected="Nextcloud settings: url, user, password_env or password_file, "
                              "ca_file, timeout, retries, folder, expire_days")

OFFLOAD_SPEC = Struct({
    "nextcloud": Field(NEXTCLOUD_SPEC, None,
                       doc="The Nextcloud server. Not set: a rule choosing offload is an error."),
    "on_failure": Field(Str(("tempfail", "encrypt")), "tempfail",
                        doc="Nextcloud down or refusing: tempfail (451) or encrypt (send a ZIP "
                            "instead)."),
}, build=OffloadSettings, expected="offload settings: nextcloud, on_failure")

SETTINGS_SPEC = Struct({
    "only_internal_senders": Field(Bool(), True,
                                   doc="Mail from outside (not internal_networks, not SMTP AUTH) "
                                       "always passes untouched."),
    "pass_clients": Field(ListOf(Network()), (),
                          doc="Clients (IPs/CIDRs) whose mail always passes untouched."),
    "subject_keyword": Field(Str(max_len=100), "",
                             doc="A Subject keyword (e.g. \"[secure]\") that forces encrypt "
                                 "and is removed; \"\" = off."),
    "inline_images": Field(Bool(), False, doc="Count images inside HTML (cid:) as attachments."),
    "encrypt": Field(ENCRYPT_SPEC, factory=EncryptSettings, doc="How the ZIP is made."),
    "notice": Field(NOTICE_SPEC, factory=NoticeSettings, doc="The password notice."),
    "offload": Field(OFFLOAD_SPEC, factory=OffloadSettings,
                     doc="Offloading attachments to Nextcloud."),
    "max_total_size": Field(Number(1024, 2**31, integer=True), 50 * 1024 * 1024,
                            doc="Decoded bytes of attachments; more gets 451 4.3.4 and is never "
                                "passed."),
    "reinject_timeout": Field(Duration(minimum=1), 30.0,
                              doc="Time for the MTA to take back a split copy or a notice."),
    "on_unparsable": Field(Str(ON_UNPARSABLE), "encrypt_whole",
                           doc="A message whose MIME cannot be trusted: encrypt_whole (the whole "
                               "message as original.eml in the ZIP) or tempfail (451 4.3.0)."),
}, build=lambda pass_clients, **kw: AttachmentsSettings(pass_clients=tuple(pass_clients),
                                                        **kw),
    expected="the attachments settings")


@dataclass(frozen=True)
class AttachmentsExpectation:
    action: str | None = None  # the mode for the test message's (first) recipient
    rule: str | None = None


EXPECT_SPEC = Struct({
    "action": Field(Str(MODES), None,
                    doc="The expected mode for the test message's (first) recipient."),
    "rule": Field(Str(), None, doc="The rule expected to decide; (defaults) when none does."),
}, build=AttachmentsExpectation, expected="expectations: action, rule")
