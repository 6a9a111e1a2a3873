"""The sender's entry in the company directory (LDAP or Active Directory, through ldap3): their
manager (for `approvers: [manager]`) and their groups (for `when: {sender_groups: [...]}`).

It uses the console's LDAP settings (console.ldap: url, TLS, timeout, bind_dn and its password
file, search_base or user_dn, mail_attribute, group_attribute, group_search_base), so the
directory is configured once. Milters read it here, never through mta.

The sender's address goes into the search filter escaped (RFC 4515): `*@example.jp` or
`x)(uid=*` stays one odd address that matches nobody. An address that matches no entry or
several has no manager and no groups: never guess whose they are. A directory that cannot
answer within console.ldap.timeout raises DirectoryDown; callers fail closed (451).
"""
from __future__ import annotations

import math
import ssl
from dataclasses import dataclass

from ldap3 import BASE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from .config_console import LdapSettings, normalize_dn
from .errors import ConfigError, MailmoatError
from .secrets import read_secret

MAX_GROUPS = 1000  # a person in more groups than this is cut at this many


class DirectoryDown(MailmoatError):
    """The directory could not be reached, refused our reader account or did not answer in
    time: what it would have said is unknown."""


@dataclass(frozen=True)
class Person:
    dn: str
    manager_dn: str | None  # the manager attribute's DN, None: not set
    groups: frozenset[str]  # normalized group DNs (normalize_dn)


def people_base(settings: LdapSettings) -> str:
    """Where people are searched: search_base, or user_dn's parent (uid={name},ou=people,...
    -> ou=people,...)."""
    if settings.search_base:
        return settings.search_base
    parts = parse_dn(settings.user_dn, escape=False)
    return ",".join(f"{kind}={value}" for kind, value, _ in parts[1:])


class Directory:
    def __init__(self, settings: LdapSettings, manager_attribute: str = "manager") -> None:
        self.settings, self.manager_attribute = settings, manager_attribute

    def person(self, address: str) -> Person | None:
        """The one entry whose mail attribute is `address`; None for none or several."""
        s = self.settings
        attributes = [s.group_attribute, self.manager_attribute]
        query = f"({s.mail_attribute}={escape_filter_chars(address.strip())})"
        conn = self._connect()
        try:
            entries = self._search(conn, people_base(s), query, SUBTREE, attributes, limit=2)
            if len(entries) != 1:
                return None
            entry = entries[0]
            groups = {dn_or_empty(g) for g in entry_values(entry, s.group_attribute)}
            if s.group_search_base:
                member = escape_filter_chars(entry["dn"])
                found = self._search(conn, s.group_search_base,
                                     f"(|(member={member})(uniqueMember={member}))", SUBTREE,
                                     [], limit=MAX_GROUPS)
                groups |= {dn_or_empty(g["dn"]) for g in found}
        finally:
            conn.unbind()
        managers = entry_values(entry, self.manager_attribute)
        return Person(entry["dn"], managers[0] if len(managers) == 1 else None,
                      frozenset(g for g in groups if g))

    def manager_address(self, address: str) -> str | None:
        """The mail address of the sender's manager; None when the sender has no entry, no
        (or several) manager, or the manager's entry has no mail address."""
        person = self.person(address)
        if person is None or person.manager_dn is None:
            return None
        conn = self._connect()
        try:
            try:
                entries = self._search(conn, person.manager_dn, "(objectClass=*)", BASE,
                                       [self.settings.mail_attribute], limit=1)
            except DirectoryDown:
                if conn.result.get("result") in (32, 34):  # noSuchObject, invalidDNSyntax
                    return None  # a manager that left the company: nobody to ask
                raise
        finally:
            conn.unbind()
        mails = [m for m in entry_values(entries[0], self.settings.mail_attribute) if "@" in m] \
            if entries else []
        return mails[0].lower() if mails else None

    def sender_groups(self, address: str) -> frozenset[str]:
        person = self.person(address)
        return person.groups if person is not None else frozenset()

    # -- ldap3 --
    def _connect(self) -> Connection:
        s = self.settings
        try:
            password = (read_secret(s.bind_password, "console.ldap",
                                    file_key="bind_password_file") if s.bind_dn else None)
        except ConfigError as exc:
            raise DirectoryDown(str(exc)) from None
        conn = ldap_connect(s, s.bind_dn or None, password)
        if conn is None:
            raise DirectoryDown("the directory refused console.ldap.bind_dn")
        return conn

    @staticmethod
    def _search(conn: Connection, base: str, query: str, scope: str, attributes: list[str],
                limit: int) -> list[dict]:
        return search_entries(conn, base, query, scope, attributes, limit)


# -- the ldap3 pieces every directory reader uses (the console's logins too) ---------------
def ldap_server(settings: LdapSettings) -> Server:
    tls = None
    if settings.starttls or settings.url.startswith("ldaps://"):
        tls = Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                  ca_certs_file=str(settings.ca_file) if settings.ca_file else None)
    return Server(settings.url, use_ssl=settings.url.startswith("ldaps://"), tls=tls,
                  connect_timeout=settings.timeout, get_info="NO_INFO")


def ldap_connect(settings: LdapSettings, dn: str | None, password: str | None
                 ) -> Connection | None:
    """A connection bound as `dn` (anonymous when None), or None when the directory says the
    credentials are wrong; DirectoryDown when it cannot answer within settings.timeout."""
    # receive_timeout: ldap3 sets it as whole seconds on the socket; a hung server ends it.
    conn = Connection(ldap_server(settings), user=dn, password=password,
                      authentication=SIMPLE if dn else None,
                      receive_timeout=max(1, math.ceil(settings.timeout)),
                      raise_exceptions=False, read_only=True, auto_bind="NONE")
    try:
        conn.open()
        if settings.starttls and not conn.start_tls():
            raise DirectoryDown(f"StartTLS failed: {conn.result.get('description')}")
        if not conn.bind():
            result = conn.result or {}
            if result.get("result") == 49:  # invalidCredentials
                conn.unbind()
                return None
            raise DirectoryDown(f"bind failed: {result.get('description') or result}")
    except (LDAPException, OSError) as exc:
        conn.unbind()
        raise DirectoryDown(f"LDAP {settings.url}: {exc or type(exc).__name__}") from None
    except DirectoryDown:
        conn.unbind()
        raise
    return conn


def search_entries(conn: Connection, base: str, query: str, scope: str,
                   attributes: list[str], limit: int = 2) -> list[dict]:
    try:
        conn.search(base, query, search_scope=scope, attributes=attributes, size_limit=limit)
    except (LDAPException, OSError) as exc:
        raise DirectoryDown(f"LDAP search: {exc or type(exc).__name__}") from None
    result = (conn.result or {}).get("result")
    if result not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
        raise DirectoryDown(f"LDAP search failed: {(conn.result or {}).get('description')}")
    return [e for e in conn.response or [] if e.get("type") == "searchResEntry"]


def entry_values(entry: dict, attribute: str) -> list[str]:
    found = (entry.get("attributes") or {}).get(attribute) or []
    return [str(v) for v in (found if isinstance(found, list) else [found])]


def dn_or_empty(text: str) -> str:
    """The DN normalized for comparison; "" for text that is no DN (it matches no group)."""
    try:
        return normalize_dn(text)
    except LDAPException:
        return ""


def open_directory(config: object) -> Directory | None:
    """The directory of a GatewayConfig (console.ldap), None when none is configured."""
    ldap = getattr(getattr(config, "console", None), "ldap", None)
    if ldap is None:
        return None
    review = getattr(config, "review", None)
    return Directory(ldap, getattr(review, "manager_attribute", "manager"))
